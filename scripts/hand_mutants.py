"""Hand-written semantic mutants: the bugs a careless change would make, planted one at a time.

Each mutant replaces one exact piece of source text by a wrong one (a dropped stop-gradient, a sum
where a mean belongs, a counter not restored on resume, ...) in a temporary copy of ``src/`` and
``tests/``, runs the tests that should catch it, and is reported *killed* (a test failed) or
*survived* (every test passed: a gap in the tests, or an equivalent mutant to argue in
docs/TESTING.md). A mutant whose text is no longer in the source is reported *stale*: update its
entry along with the code. CI does not run this; run it after touching a module (docs/TESTING.md):

    python scripts/hand_mutants.py                      # every mutant
    python scripts/hand_mutants.py objectives trainer   # the mutants of modules whose path contains a word
    python scripts/hand_mutants.py --list               # list them, run nothing

Exit status 1 when a mutant survived or is stale.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    path: str  # under src/meanflow/
    what: str  # the bug, in words
    old: str  # exact source text, present once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files (relative to the repository root)


MUTANTS = (
    # ---- objectives -----------------------------------------------------------------------------------
    Mutant("objectives/time_samplers.py", "r != t count rounded half to even (iMF: 2 of 5 rows instead of 3)",
           "return total - math.floor(total * (1 - Fraction(repr(float(ratio)))))", "return int(round(ratio * total))",
           ("tests/test_objective.py::test_the_r_neq_t_count_is_the_official_codes_for_every_batch_size",
            "tests/test_imf_objective.py::test_an_odd_batch_has_the_official_count_of_r_not_t_rows")),
    Mutant("objectives/time_samplers.py", "r != t count on the binary float 1 - ratio (0.9: every row)",
           "return total - math.floor(total * (1 - Fraction(repr(float(ratio)))))", "return total - int(total * (1 - ratio))",
           ("tests/test_objective.py::test_the_r_neq_t_count_is_the_official_codes_for_every_batch_size",)),
    Mutant("objectives/guidance.py", "the guided field's model calls recorded by autograd",
           "        with torch.no_grad():\n            if self.kappa", "        with torch.enable_grad():\n            if self.kappa",
           ("tests/test_stop_gradients.py",)),
    Mutant("objectives/imf.py", "iMF's guided field and tangent recorded by autograd",
           "        with torch.no_grad():\n            if labels is None:", "        with torch.enable_grad():\n            if labels is None:",
           ("tests/test_stop_gradients.py",)),
    Mutant("objectives/meanflow.py", "the model tangent u(z, t, t) recorded by autograd",
           "    with torch.no_grad():\n        u_tt", "    with torch.enable_grad():\n        u_tt",
           ("tests/test_stop_gradients.py",)),
    Mutant("objectives/base.py", "adaptive weight not under stop-gradient",
           "return d / (d.detach() + self.weight_eps).pow(self.weight_power)",
           "return d / (d + self.weight_eps).pow(self.weight_power)",
           ("tests/test_stop_gradients.py", "tests/test_objective.py")),
    # ---- autodiff -------------------------------------------------------------------------------------
    Mutant("autodiff/forward_ad.py", "compiled forward-mode path drops the time tangent",
           "active = [i for i, tangent in enumerate(tangents) if tangent is not None]",
           "active = [i for i, tangent in enumerate(tangents) if tangent is not None][:1]",
           ("tests/test_rows_compiled.py::test_forward_mode_on_a_compiled_model_moves_t_along_its_tangent",)),
    Mutant("autodiff/rows_compiled.py", "a compiled row pass reused across conditioning names",
           "layout, tuple(conditioning), return_v,", "layout, return_v,",
           ("tests/test_rows_compiled.py::test_the_signature_tells_apart_conditioning_names_labels_tangents_and_heads",)),
    Mutant("autodiff/rows_compiled.py", "a compiled row pass reused with and without the second head",
           "layout, tuple(conditioning), return_v,", "layout, tuple(conditioning),",
           ("tests/test_rows_compiled.py::test_the_signature_tells_apart_conditioning_names_labels_tangents_and_heads",)),
    # ---- runtime --------------------------------------------------------------------------------------
    Mutant("runtime/distributed.py", "explicit all-reduce sums the gradients instead of averaging",
           "    flat /= world_size\n", "",
           ("tests/test_parallel_gradients.py::test_the_explicit_all_reduce_averages_gradients_as_one_process_on_the_whole_batch",)),
    Mutant("runtime/per_sample.py", "stacked copies numbered with the local batch size (ids collide across processes)",
           "return torch.cat([self.current + c * self.total for c in range(size // n)])",
           "return torch.cat([self.current + c * n for c in range(size // n)])",
           ("tests/test_per_sample_dropout.py::test_stacked_copies_of_the_batch_and_of_a_layer_get_their_own_masks_whatever_the_split",)),
    Mutant("runtime/per_sample.py", "stacked copies share one mask",
           "return torch.cat([self.current + c * self.total for c in range(size // n)])",
           "return self.current.repeat(size // n)",
           ("tests/test_per_sample_dropout.py::test_stacked_copies_of_the_batch_and_of_a_layer_get_their_own_masks_whatever_the_split",)),
    # ---- training -------------------------------------------------------------------------------------
    Mutant("training/trainer.py", "the guard's run of consecutive skipped steps not restored on resume",
           "guard = NonFiniteGuard(info.device, cfg.train.max_bad_steps, state.bad_steps, state.consecutive_bad)",
           "guard = NonFiniteGuard(info.device, cfg.train.max_bad_steps, state.bad_steps)",
           ("tests/test_resume.py::test_a_run_stopped_at_any_step_resumes_to_the_uninterrupted_run",)),
    Mutant("training/trainer.py", "the skipped-step count not restored on resume",
           'bad_steps=saved["bad_steps"], consecutive_bad', 'bad_steps=0, consecutive_bad',
           ("tests/test_resume.py::test_a_run_stopped_at_any_step_resumes_to_the_uninterrupted_run",)),
    Mutant("training/trainer.py", "only the first EMA restored on resume",
           "ema.load_state_dict(i, ckpt.read_weights(path / EMA.file_name(i, decay)))",
           "ema.load_state_dict(0, ckpt.read_weights(path / EMA.file_name(0, decay)))",
           ("tests/test_resume.py::test_a_run_stopped_at_any_step_resumes_to_the_uninterrupted_run",)),
    Mutant("training/trainer.py", "the gradient clip computed but not applied",
           "        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)\n", "        pass\n",
           ("tests/test_parallel_gradients.py::test_the_optimizer_gets_the_gradient_clipped_to_the_configured_norm",)),
    Mutant("training/trainer.py", "the configured clip not passed on",
           '"grad_norm": _grad_norm(model, cfg.train.grad_clip)', '"grad_norm": _grad_norm(model, 0.0)',
           ("tests/test_parallel_gradients.py::test_the_optimizer_gets_the_gradient_clipped_to_the_configured_norm",)),
    Mutant("training/ema.py", "EMA moves towards the weights by the decay instead of 1 - decay",
           "weight = 1.0 - decay if applied is None else applied.float() * (1.0 - decay)",
           "weight = decay if applied is None else applied.float() * decay",
           ("tests/test_trainer_invariants.py::test_ema_follows_its_formula_for_every_decay",)),
    # ---- models ---------------------------------------------------------------------------------------
    Mutant("models/imf_dit.py", "the v-head's final layer not zero-initialised",
           "        for final in (self.u_final_layer, self.v_final_layer):", "        for final in (self.u_final_layer,):",
           ("tests/test_imf_dit.py::test_initialisation_is_the_official_one_parameter_by_parameter",)),
    Mutant("models/imf_dit.py", "residual gates start at one",
           "self.attn_scale = nn.Parameter(torch.zeros(hidden))", "self.attn_scale = nn.Parameter(torch.ones(hidden))",
           ("tests/test_imf_dit.py::test_initialisation_is_the_official_one_parameter_by_parameter",)),
    Mutant("models/imf_dit.py", "rotary tables rounded to float32",
           "    return angles.cos(), angles.sin()", "    return angles.cos().float(), angles.sin().float()",
           ("tests/test_imf_dit.py::test_the_float64_network_rotates_with_float64_tables",)),
    Mutant("models/pretrained.py", "JAX checkpoints load the raw weights when the EMA is asked for",
           'key = "ema_params" if weights == "ema" else "params"', 'key = "params"',
           ("tests/test_pretrained.py",)),
    Mutant("models/pretrained.py", "JAX dense kernels loaded without the transpose",
           "array = array.permute(3, 2, 0, 1) if array.ndim == 4 else array.T",
           "array = array.permute(3, 2, 0, 1) if array.ndim == 4 else array",
           ("tests/test_pretrained.py",)),
)


def run(mutant: Mutant, copy: Path) -> tuple[str, float]:
    """('killed' | 'survived' | 'stale', seconds) of one mutant in the copy ``copy`` (restored after)."""
    target = copy / "src" / "meanflow" / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        return "stale", 0.0
    target.write_text(original.replace(mutant.old, mutant.new))
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.time()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                                cwd=copy, env=env, capture_output=True, text=True, check=False)
    finally:
        target.write_text(original)
    return ("survived" if result.returncode == 0 else "killed"), time.time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="run the mutants whose module path contains one of these words")
    parser.add_argument("--list", action="store_true", help="list the selected mutants and run nothing")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.modules or any(word in m.path for word in args.modules)]
    if args.list:
        for m in chosen:
            print(f"{m.path:30} {m.what}")
        return 0
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="hand-mutants-") as tmp:
        copy = Path(tmp)
        for name in ("src", "tests", "benchmarks"):
            shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
        for m in chosen:
            verdict, seconds = run(m, copy)
            verdicts.append(verdict)
            print(f"{verdict:8} {seconds:6.0f} s  {m.path:30} {m.what}", flush=True)
    print(f"{verdicts.count('killed')} killed, {verdicts.count('survived')} survived, {verdicts.count('stale')} stale of {len(verdicts)}")
    return int(any(v != "killed" for v in verdicts))


if __name__ == "__main__":
    sys.exit(main())
