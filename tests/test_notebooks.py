"""The tutorial notebooks: Python sources paired with stored .ipynb files, and executing correctly.

Each notebook's source is ``notebooks/NN_name.py`` in jupytext's percent format (``# %%`` code
cells, ``# %% [markdown]`` text cells), paired with ``NN_name.ipynb`` (``notebooks/jupytext.toml``).
The stored .ipynb must hold the same cells as its source, and no outputs.

Each notebook is built from its .py source (``jupytext.read``) and executed with nbclient in a
temporary working directory, on a kernel that runs *this* interpreter (a kernel spec written for
the test, launching ``sys.executable -m ipykernel_launcher``: only ipykernel is needed, and no
kernel registered elsewhere on the machine can be picked up by mistake). Every notebook ends with
a cell tagged ``checks`` that asserts its key claims and leaves them in ``CHECKS``; the test reads
that dict back from the kernel and checks the main values itself, so a wrong core breaks the
test, not just a plot.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
jupytext = pytest.importorskip("jupytext")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from nbclient import NotebookClient  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402
from traitlets import default  # noqa: E402  (a dependency of jupyter_client)

from tests.fixtures.tree import assert_in_tree, tree_env  # noqa: E402

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "dirl-min-notebook-test"
CELL_TIMEOUT = 240  # seconds per cell; notebook 04's training cell is the longest (~40 s on 2 busy cores)
PROBE_MARK = "@@NOTEBOOK_PROBE@@"
PROBE = (
    "import json as _json, sys as _sys, torch as _torch\n"
    f"print({PROBE_MARK!r} + _json.dumps({{'executable': _sys.executable, 'prefix': _sys.prefix, 'checks': CHECKS,"
    " 'threads': _torch.get_num_threads(), 'dirl_min': __import__('dirl_min').__file__}, default=str))"
)


NAMES = sorted(p.stem for p in NB_DIR.glob("[0-9][0-9]_*.py"))


def _cells(nb) -> list[tuple[str, str, dict]]:
    return [(c.cell_type, c.source, dict(c.metadata)) for c in nb.cells]


def test_the_notebooks_exist():
    assert NAMES == ["01_masks_and_noise", "02_block_decoding", "03_dipo", "04_end_to_end", "05_objectives"]
    assert sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == NAMES, "stray or missing notebook files"
    assert sorted(p.name for p in NB_DIR.glob("*.py")) == [f"{n}.py" for n in NAMES], "stray notebook sources"


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_is_in_sync_with_its_source(name):
    text = (NB_DIR / f"{name}.py").read_text(encoding="utf-8")
    assert jupytext.formats.guess_format(text, ".py")[0] == "percent", f"{name}.py is not in percent format"
    source = jupytext.reads(text, fmt="py:percent")
    stored = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    # the same cells, in order: kind, text and metadata (the `checks` tag); ids and outputs aside
    assert _cells(stored) == _cells(source), f"{name} drifted: run `jupytext --sync notebooks/{name}.py`"
    assert stored.metadata.get("kernelspec") == source.metadata.get("kernelspec")


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs_and_a_checks_cell(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"{name}: cell {c.id} carries outputs"
    assert "from dirl_min.tutorial import setup" in code[0].source and "= setup()" in code[0].source
    last = code[-1]
    assert last.metadata.get("tags") == ["checks"], f"{name}: the last code cell must be the checks cell"
    assert "CHECKS = {" in last.source and last.source.count("assert ") >= 3
    assert sum("checks" in c.metadata.get("tags", []) for c in code) == 1
    assert all(c.cell_type in ("markdown", "code") for c in nb.cells)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


def test_the_printing_helpers_put_bars_on_absolute_block_boundaries():
    from dirl_min.model import build_tiny_tokenizer
    from dirl_min.tutorial import glyphs, in_blocks

    assert in_blocks("abcdefghij", 4) == "abcd|efgh|ij"
    assert in_blocks("cdefgh", 4, start=2) == "cd|efgh"  # positions 2..7: the first block is cut at 4
    assert in_blocks("ef", 4, start=4) == "ef"
    tok = build_tiny_tokenizer()
    ids = tok.encode("a\n", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    assert glyphs(tok, ids) == "a⏎⟩∎"


def test_the_decode_timeline_commits_each_token_once_and_caches_each_block_once():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dirl_min.tutorial import decode_timeline

    B = 4
    steps = [0] * 6 + [1, 1, 2, 2, 2, 2, 4, 3, 3, 5]  # prompt of 6 (block 1 partly given), then 3 blocks
    fig, ax = plt.subplots()
    state = decode_timeline(ax, steps, B)
    plt.close(fig)
    assert state.shape == (5, len(steps))  # one row per forward: fused, a forward is a step
    committed = state == 4
    assert (committed.sum(0) == (np.array(steps) > 0)).all()  # each generated token committed once
    assert all(committed[f, j] == (steps[j] == f + 1) for f in range(5) for j in range(len(steps)))
    written = state == 2
    assert written.sum(0).tolist() == [1] * 12 + [0] * 4  # every block but the last enters the cache once
    # each block is written by the first step of the next one (the fused commit)
    assert written[0, :4].all() and written[1, 4:8].all() and written[2, 8:12].all()
    assert (state[-1, :12] == 1).all()  # and stays there


@pytest.fixture(scope="module")
def kernel_manager_class(tmp_path_factory):
    """A kernel manager class whose only kernel spec launches this interpreter.

    Passed to nbclient as a class (not an instance) so that nbclient owns the kernel and shuts it
    down after each notebook.
    """
    root = tmp_path_factory.mktemp("kernels")
    spec_dir = root / KERNEL_NAME
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dirl_min notebook test",
        "language": "python",
        "env": {"PYTHONPATH": tree_env()["PYTHONPATH"]},  # the kernel runs in tmp_path: import this tree
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))

    class ThisInterpreterKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _only_this_interpreter(self):
            return KernelSpecManager(kernel_dirs=[str(root)], ensure_native_kernel=False)

    return ThisInterpreterKernelManager


def execute(name: str, kernel_manager_class, workdir: Path):
    """Build a notebook from its .py source, run it (plus a probe cell) in ``workdir``.

    Returns (executed nb, probe dict, seconds).
    """
    nb = jupytext.read(NB_DIR / f"{name}.py")
    nbformat.validate(nb)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, kernel_manager_class=kernel_manager_class,
                            timeout=CELL_TIMEOUT, startup_timeout=120, allow_errors=False,
                            resources={"metadata": {"path": str(workdir)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:  # the message holds the failing cell's source and traceback
        pytest.fail(f"{name}: a cell raised\n{exc}")
    seconds = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: error outputs {[(e.ename, e.evalue) for e in errors]}"
    unexecuted = [c.id for c in nb.cells if c.cell_type == "code" and c.execution_count is None]
    assert not unexecuted, f"{name}: cells not executed: {unexecuted}"
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert PROBE_MARK in text, f"{name}: the probe printed nothing: {text!r}"
    probe = json.loads(text.split(PROBE_MARK, 1)[1].strip())
    return nb, probe, seconds


def _figures(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _check_01(c):
    assert c["masks_match_reference"] and c["mask_is_union_of_clauses"]
    assert c["clean_queries_never_see_noisy_keys"]
    assert c["clean_half_equals_block_causal_pass"] < 1e-5
    assert c["prompt_never_masked"] and c["every_row_masked"]
    assert c["weighted_loss_rel_err"] < 0.05
    losses = list(c["real_loss_by_level"].values())  # a briefly trained model: the loss rises with the masking
    assert losses[-1] > losses[0]


def _check_02(c):
    assert c["first_step_matches_hand"] and c["some_step_commits_several"] and c["step_map_monotone"]
    assert c["hand_commits_by_threshold"] >= 2, "the threshold rule is never seen committing several tokens"
    assert c["loop_matches_engine"] and c["answer_is_boxed"] and c["timeline_forwards"]
    assert c["tps_in_range"] and c["tps_low_threshold"] > 2.0 and c["tps_high_threshold"] == 1.0
    assert c["static_k1_tps"] == 1.0
    assert c["fused_saves_one_forward_per_block"]
    assert c["cached_equals_reference"] and c["max_logp_diff_vs_reference"] < 1e-4


def _check_03(c):
    assert c["max_abs_diff"] < 1e-4, "consistency invariant: rescore != recorded logp"
    assert c["reference_rescore_diff"] < 1e-4 and c["packed_vs_per_round"] < 1e-5
    assert c["wrong_step_map_diff"] > 1e-2 and c["rounds"] > 1
    assert c["every_token_target_once"] and c["step_rounds_match_reference"] and c["step_rounds_by_hand_match"]
    assert abs(c["zero_advantage_dilution"] - c["dilution_expected"]) < 1e-6 and c["dilution_expected"] < 1
    assert c["advantages_match_reference"] and c["filter_matches_reference"]
    assert c["kept_groups"] == [True, True, False, False]
    assert c["grad_is_minus_A_over_N"] and c["loss_matches_reference"] and c["clip_zero_grad"]


def _check_04(c):
    assert c["stages"] == ["base", "sft", "rl"]
    assert c["sft_rows"] == 150 and c["rl_rows"] == 10
    assert c["sft_ci_low"] > c["accuracy"]["base"], "no visible SFT gain"
    assert c["boxed_share"]["sft"] == 1.0 and c["table_printed_by_main"]
    assert c["sft_loss_last"] < c["sft_loss_first"] / 5
    assert all(1.0 <= v <= 4.0 for v in c["tps"].values())
    assert c["tps"]["base"] == 1.0 and c["tps"]["sft"] > 1.0
    assert c["ratio_is_one"] and c["rl_updates"] > 0


def _check_05(c):
    assert c["read_once"] and c["scored_every_token"] and c["same_as_trainer"]
    assert c["tracerl_s1_is_dipo"] and c["tracerl_matches_reference"] and c["tracerl_no_lookahead"]
    assert c["d1_hides_response"] and c["d1_prompt_masked"] > 0 and c["coupled_complementary"]
    assert c["copies"] == c["expected_copies"] and c["copies"]["diffu_grpo_masked_context"] * 2 == c["copies"]["coupled_grpo"]
    assert c["max_diff"]["dipo"] < 1e-4, "consistency invariant: dipo's views != recorded logp"
    assert min(c["max_diff"][n] for n in ("tracerl", "diffu_grpo_masked_context", "coupled_grpo")) > 1e-2
    assert c["mismatch"]["dipo"] == [0.0, 0.0] and c["mismatch"]["tracerl"][1] == 0.0
    d = c["diagnosis"]  # the exact core's own row, and the estimates' biases against it
    assert d["dipo"]["logp_gap"] <= 1e-5 and d["dipo"]["grad_cosine"] >= 0.9999
    assert d["tracerl"] == d["dipo"], "tracerl at s = 1 reads as dipo"
    assert all(d[n]["logp_gap"] > 1e-3 and d[n]["grad_cosine"] < 0.9999
               for n in ("tracerl_s2", "diffu_grpo", "coupled_grpo", "diffu_grpo_masked_context"))


CHECKERS = {"01": (_check_01, 4), "02": (_check_02, 2), "03": (_check_03, 3), "04": (_check_04, 1),
            "05": (_check_05, 2)}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_and_its_claims_hold(name, kernel_manager_class, tmp_path):
    nb, probe, seconds = execute(name, kernel_manager_class, tmp_path)
    assert (probe["executable"], probe["prefix"]) == (sys.executable, sys.prefix), "kernel ran another interpreter"
    assert_in_tree(probe["dirl_min"])
    assert probe["threads"] == 1, "the first cell's setup() leaves torch on one thread"
    check, min_figures = CHECKERS[name[:2]]
    check(probe["checks"])
    assert _figures(nb) >= min_figures, f"{name}: expected at least {min_figures} figures"
    print(f"{name}: {seconds:.1f} s")
