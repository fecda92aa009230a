"""``lit-decay inspect``: run as a user runs it (a subprocess, from the project root), and its usage errors.

Every start of the command imports torch and the package (several seconds of CPU), so the subprocesses of this file
are few and started together once, in a module-scoped fixture; each test reads its run's result. The rest goes
through ``main()`` in-process (what the console script calls), each usage error as its own test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from lit_decay.cli import main

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 60


def console_script() -> str:
    beside = Path(sys.executable).with_name("lit-decay")
    found = str(beside) if beside.exists() else shutil.which("lit-decay")
    if not found:
        pytest.fail("the lit-decay console script is not installed next to the interpreter nor on PATH")
    return found


MODULE = [sys.executable, "-m", "lit_decay.cli"]

# name -> (command prefix: "module" or "script", arguments after it). Kept few: each start costs seconds of CPU.
RUNS: dict[str, tuple[str, list[str]]] = {
    "gpt_table": ("module", ["inspect", "examples.models:TinyGPT"]),
    "gpt_json": (
        "script",
        [
            "inspect",
            "examples.models:TinyGPT",
            "--json",
            "--init-args",
            '{"n_layer": 1}',
            "--weight-decay",
            "0.3",
            "--mode",
            "l2",
        ],
    ),
    "mlp_table": ("module", ["inspect", "examples.models:MLP", "--weight-decay", "0.3", "--mode", "decoupled_l1"]),
    "missing_module": ("script", ["inspect", "no_such_package.models:Net"]),
}


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cli(name: str) -> Result:
    kind, args = RUNS[name]
    command = (MODULE if kind == "module" else [console_script()]) + args
    # subprocess.run kills the child when the timeout expires.
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def runs() -> dict[str, Result]:
    # Two at a time: start-up is CPU-bound, and more would only stretch each run towards its timeout.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(RUNS, pool.map(run_cli, RUNS)))


def tinygpt_tensor_count(n_layer: int) -> int:
    # tok_emb + pos_emb (lm_head is tied) + 12 per block (ln_1, qkv, proj, ln_2, two MLP Linears; weight and bias each)
    # + ln_f weight and bias.
    return 2 + 12 * n_layer + 2


def test_table_of_tinygpt(runs: dict[str, Result]) -> None:
    result = runs["gpt_table"]
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"TinyGPT: {tinygpt_tensor_count(2)} trainable tensors (")
    assert lines[0].endswith("0 frozen (0 elements)")

    def row(name: str) -> tuple[str, ...]:
        matching = [
            m
            for line in lines
            if (m := re.fullmatch(rf"{re.escape(name)}\s+(\(.*?\))\s+([\d,]+)\s+(\S+)\s+(.*)", line))
        ]
        assert len(matching) == 1, name
        return matching[0].groups()

    assert row("tok_emb.weight") == ("(65, 64)", "4,160", "decay", "embedding; tied to lm_head.weight")
    assert row("blocks.0.ln_1.weight") == ("(64,)", "64", "no_decay", "normalization layer LayerNorm")
    assert row("blocks.1.attn.qkv.weight") == ("(192, 64)", "12,288", "decay", "ndim=2 weight")
    assert row("blocks.1.attn.qkv.bias") == ("(192,)", "192", "no_decay", "bias")
    assert not any(line.startswith("lm_head.weight") for line in lines)


def test_json_init_args_weight_decay_and_mode_from_the_console_script(runs: dict[str, Result]) -> None:
    result = runs["gpt_json"]
    assert (result.returncode, result.stderr) == (0, "")
    data = json.loads(result.stdout)
    assert data["model"] == "TinyGPT"
    for row in data["parameters"]:
        assert set(row) == {"name", "shape", "numel", "group", "reason", "aliases"}
    assert data["parameters"][0] == {
        "name": "tok_emb.weight",
        "shape": [65, 64],
        "numel": 4160,
        "group": "decay",
        "reason": "embedding",
        "aliases": ["lm_head.weight"],
    }
    # --init-args '{"n_layer": 1}' reached the constructor: one block instead of the default two.
    names = [row["name"] for row in data["parameters"]]
    assert len(names) == tinygpt_tensor_count(1)
    assert any(n.startswith("blocks.0.") for n in names)
    assert not any(n.startswith("blocks.1.") for n in names)
    assert [(g["name"], g["mode"], g["coefficient"]) for g in data["groups"]] == [
        ("decay", "l2", 0.3),
        ("no_decay", "none", 0.0),
    ]


def test_usage_error_in_a_subprocess(runs: dict[str, Result]) -> None:
    result = runs["missing_module"]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "lit-decay: error: cannot import module 'no_such_package.models': No module named 'no_such_package'"
    ]


def test_mlp_table_reflects_weight_decay_and_mode(runs: dict[str, Result]) -> None:
    result = runs["mlp_table"]
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("MLP: 6 trainable tensors (")
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["group", "mode", "coefficient"],
        ["decay", "decoupled_l1", "0.3"],
        ["no_decay", "none", "0"],
    ]
    assert any(line.split()[:1] == ["net.1.weight"] and "normalization layer BatchNorm1d" in line for line in lines)
    assert any(line.split()[:1] == ["net.0.weight"] and "ndim=2 weight" in line for line in lines)


# --- in-process: main() as the console script calls it -------------------------------------------------------------


def run_main(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[object, str, str]:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the working directory on it
    try:
        code: object = main(argv)
    except SystemExit as exit_:  # argparse's own errors end this way
        code = exit_.code
    except Exception as error:  # what a user would see as a traceback
        pytest.fail(f"main({argv}) raised {error!r} instead of returning 2")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_exclude_embeddings_and_decay_1d_flags(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_main(
        ["inspect", "examples.models:TinyGPT", "--json", "--exclude-embeddings", "--decay-1d"], capsys, monkeypatch
    )
    assert code == 0
    rows = {row["name"]: (row["group"], row["reason"]) for row in json.loads(out)["parameters"]}
    assert rows["tok_emb.weight"] == ("no_decay", "embedding (exclude_embeddings=True)")
    # Norms and biases stay out even with --decay-1d: their own rules come first.
    assert rows["ln_f.weight"] == ("no_decay", "normalization layer LayerNorm")
    assert rows["blocks.0.attn.qkv.bias"] == ("no_decay", "bias")


def test_lr_shows_each_groups_lr_and_timescale(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["inspect", "torch.nn:Linear", "--init-args", '{"in_features": 2, "out_features": 3}', "--weight-decay"]
    code, out, _ = run_main([*argv, "0.1", "--lr", "0.001"], capsys, monkeypatch)
    assert code == 0
    assert "Learning rates at base lr=0.001:" in out.splitlines()
    assert re.search(r"^  decay\s+0\.001\s+10,000$", out, re.M)
    code, out, _ = run_main([*argv, "0.1", "--lr", "0.001", "--json"], capsys, monkeypatch)
    assert [(g["name"], g["lr"]) for g in json.loads(out)["groups"]] == [("decay", 0.001), ("no_decay", 0.001)]
    code, out, _ = run_main([*argv, "0.1"], capsys, monkeypatch)
    assert "Learning rates" not in out  # without --lr there is no lr to show


def test_a_function_building_a_hugging_face_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_main(
        ["inspect", "examples.models:tiny_vit", "--init-args", '{"num_labels": 3}', "--json"], capsys, monkeypatch
    )
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["model"] == "ViTForImageClassification"
    rows = {row["name"]: (row["group"], row["reason"]) for row in data["parameters"]}
    assert rows["vit.embeddings.cls_token"] == ("no_decay", "token embedding (cls_token)")
    assert rows["classifier.weight"] == ("decay", "ndim=2 weight")
    assert [g["coefficient"] for g in data["groups"]] == [0.01, 0.0]  # configure_adam's default weight decay


def test_layer_decay_shows_each_tensors_layer_and_lr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_main(["inspect", "examples.models:TinyGPT", "--layer-decay", "0.5"], capsys, monkeypatch)
    assert code == 0
    lines = out.splitlines()
    # without --lr, configure_adam's lr=1e-3 is the base
    assert "Learning rates at base lr=0.001:" in lines
    assert any(line.startswith("Layer-wise lr decay 0.5: ") and "blocks.{0..1}" in line for line in lines)
    assert re.search(r"^name\s+shape\s+numel\s+group\s+layer\s+lr\s+reason$", out, re.M)
    assert re.search(r"^tok_emb\.weight\s+\(65, 64\)\s+4,160\s+layer_0\.decay\s+0\s+0\.000125\s+embedding", out, re.M)
    assert re.search(r"^blocks\.1\.ln_1\.bias\s+\(64,\)\s+64\s+layer_2\.no_decay\s+2\s+0\.0005\s+", out, re.M)
    assert re.search(r"^ln_f\.weight\s+\(64,\)\s+64\s+layer_3\.no_decay\s+3\s+0\.001\s+", out, re.M)
    code, out, _ = run_main(
        ["inspect", "examples.models:TinyGPT", "--layer-decay", "0.5", "--lr", "0.1", "--json"], capsys, monkeypatch
    )
    data = json.loads(out)
    # lm_head is tied to tok_emb, so it is in layer 0; after the blocks only the final norm is left (no decay)
    assert [(g["name"], g["layer"]) for g in data["groups"]] == [
        ("layer_0.decay", 0),
        ("layer_1.decay", 1),
        ("layer_1.no_decay", 1),
        ("layer_2.decay", 2),
        ("layer_2.no_decay", 2),
        ("layer_3.no_decay", 3),
    ]
    assert data["groups"][0]["lr"] == pytest.approx(0.1 * 0.5**3)


# --- the same errors in-process (what main() returns and prints) ----------------------------------------------------

ERRORS = {
    "nonexistent module": (["inspect", "no_such_package.models:Net"], "no_such_package"),
    "nonexistent class": (["inspect", "examples.models:NoSuchNet"], "NoSuchNet"),
    "a module, not a class": (["inspect", "examples.models:F"], "is a module, not a class or a function"),
    "not callable": (["inspect", "os:sep"], "is a str, not a class or a function returning a module"),
    "function needing arguments": (["inspect", "os.path:join"], "join needs argument(s) a: give them with --init-args"),
    "class needing arguments": (
        ["inspect", "torch.nn:Linear", "--init-args", '{"bias": false}'],
        "Linear needs argument(s) in_features, out_features: give them with --init-args JSON, e.g. --init-args "
        '\'{"bias": false, "in_features": ..., "out_features": ...}\'',
    ),
    "hugging face class needing a config": (
        ["inspect", "transformers:BertModel"],
        "BertModel needs argument(s) config: give them with --init-args JSON, e.g. --init-args '{\"config\": ...}'; "
        "for one JSON cannot write (a config object), inspect a function that builds the model",
    ),
    "function returning no module": (["inspect", "os:getcwd"], "getcwd(**{}) returned a str, not a torch.nn.Module"),
    "no colon": (["inspect", "examples.models"], "MODULE:NAME"),
    "empty class": (["inspect", "examples.models:"], "MODULE:NAME"),
    "empty module": (["inspect", ":TinyGPT"], "MODULE:NAME"),
    "bad json": (["inspect", "examples.models:TinyGPT", "--init-args", "{n_layer: 1}"], "JSON"),
    "json not an object": (["inspect", "examples.models:TinyGPT", "--init-args", "[1]"], "JSON object"),
    "unknown init arg": (["inspect", "examples.models:TinyGPT", "--init-args", '{"layers": 1}'], "layers"),
    "init arg value rejected": (
        ["inspect", "examples.models:TinyGPT", "--init-args", '{"n_embd": 10, "n_head": 4}'],
        "n_embd",
    ),
    "bad mode": (["inspect", "examples.models:MLP", "--mode", "adamw"], "adamw"),
    "bad weight decay": (["inspect", "examples.models:MLP", "--weight-decay", "-1"], "-1"),
    "bad lr": (["inspect", "examples.models:MLP", "--lr", "-0.5"], "lr must be a finite number >= 0; got -0.5"),
    "no trainable parameters": (["inspect", "torch.nn:Identity"], "no trainable parameters"),
    "bad layer decay": (
        ["inspect", "examples.models:TinyGPT", "--layer-decay", "1.5"],
        "layer_decay must be a number in (0, 1]",
    ),
    "layer decay without blocks": (
        ["inspect", "examples.models:MLP", "--layer-decay", "0.75"],
        "layer_decay=0.75 needs the model's repeated blocks, but MLP has none",
    ),
}


@pytest.mark.parametrize(("argv", "named"), list(ERRORS.values()), ids=list(ERRORS))
def test_usage_errors(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_main(argv, capsys, monkeypatch)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert named in lines[0]
    assert lines[0].startswith("lit-decay")


# --- the user's own code failing on the way: one line, exit code 2 -------------------------------------------------

BROKEN = {
    "syntax error on import": ("def broken(:\n", "cannot import module", "SyntaxError"),
    "raises on import": ("raise RuntimeError('no GPU here')\n", "cannot import module", "RuntimeError: no GPU here"),
    "exits on import": ("import sys\nsys.exit(0)\n", "cannot import module", "SystemExit(0)"),
    "constructor exits 0": (
        "import sys\nfrom torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n        sys.exit(0)\n",
        "cannot build Net",
        "SystemExit(0)",
    ),
    "no_weight_decay raises": (
        "from torch import nn\n"
        "class Net(nn.Linear):\n"
        "    def __init__(self):\n        super().__init__(2, 2)\n"
        "    def no_weight_decay(self):\n        raise KeyError('pos_embed')\n",
        "cannot group the parameters of Net",
        "KeyError: 'pos_embed'",
    ),
}


@pytest.mark.parametrize(("source", "part", "named"), list(BROKEN.values()), ids=list(BROKEN))
def test_user_code_failing_is_one_line_and_exit_2(
    source: str,
    part: str,
    named: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    module = "broken_" + re.sub(r"\W", "_", request.node.callspec.id)  # a fresh name: never in sys.modules yet
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    code, out, err = run_main(["inspect", f"{module}:Net"], capsys, monkeypatch)
    assert (code, out) == (2, "")
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lit-decay: error: ")
    assert named in lines[0] and part in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("target", [".models:TinyGPT", "..examples.models:TinyGPT"])
def test_relative_module_path_is_one_line_and_exit_2(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_main(["inspect", target], capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert err == (
        "lit-decay: error: MODULE must be an absolute module path, importable from the current directory "
        f"(e.g. examples.models); got the relative {target.partition(':')[0]!r}\n"
    )
