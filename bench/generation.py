"""Generation cost, in ONE run: a batched ensemble vs N separate PEFT adapter runs, and
the time generation adds to the study, method by method.

1. Ensemble generation tokens/s over N experts: lorafuse's EnsembleDecoder (every
   expert's rows in one forward per token, each with its own KV cache, probabilities
   mixed) against N separate runs of one PEFT adapter each (`PeftModel` with the N
   adapters loaded, `set_adapter(i)`, transformers' `generate` with its KV cache): what
   an ensemble costs when each expert runs alone, before any mixing (goal: the batched
   ensemble >= 1.5x faster). Greedy, every sequence forced to the same number of new
   tokens (no early stop), the same prompts (the test sources of the library). The two
   alternate round by round; the ratio is the median of the per-round ratios.
2. The generation the study adds: `generate_answers` of every method of a study preset
   (its answers cap and max_new_tokens) on the library's test split, with the fits of
   a finished study, beside the method's test-loss evaluation time.

    python bench/generation.py --library runs/small --fits runs/study/fits
    python bench/generation.py --library runs/small --experts private --skip-study
    python bench/generation.py --library runs/small --skip-ensemble   # part 2 only
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a machine shared with other work
    the CPU time is the steadier measure of the work itself."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def ensemble_vs_peft(ws, kind: str, prompts: int, tokens: int, rounds: int) -> None:
    """Part 1: tokens/s of the batched ensemble and of N separate PEFT adapter runs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafuse.answers import answer_prompts
    from lorafuse.generate import EnsembleDecoder, greedy, left_pad
    from lorafuse.model import attached

    lib = ws.library(kind)
    N = len(lib)
    p = answer_prompts(ws, "test", max(1, prompts // len(ws.tasks) + 1))
    ids, mask = left_pad(p.ids[:prompts], ws.pad_id)  # (B, T)
    B = ids.shape[0]
    caps = torch.full((B,), tokens)
    base = AutoModelForCausalLM.from_pretrained(ws.base_id).eval()
    folders = [e.path for e in lib.experts]
    peft = PeftModel.from_pretrained(base, str(folders[0]), adapter_name=lib.names[0])
    for name, folder in zip(lib.names[1:], folders[1:]):
        peft.load_adapter(str(folder), adapter_name=name)
    peft.eval()

    def run_peft() -> None:
        with torch.inference_mode():
            for name in lib.names:
                peft.set_adapter(name)
                peft.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                    min_new_tokens=tokens, do_sample=False, pad_token_id=ws.pad_id,
                )  # fmt: skip

    model = ws.model
    w = torch.full((N,), 1.0 / N)
    with attached(model, lib, "factors") as fusion:

        def run_ensemble() -> None:
            greedy(EnsembleDecoder(model, fusion, w, "probs"), ids, mask, caps, eos_id=-1)

        run_ensemble(), run_peft()  # warm-up (kernels, allocations)
        ratios, cpu_ratios, ens_s, peft_s = [], [], [], []
        for _ in range(rounds):
            (e, e_cpu), (q, q_cpu) = timed_both(run_ensemble), timed_both(run_peft)
            ens_s.append(e)
            peft_s.append(q)
            ratios.append(q / e)
            cpu_ratios.append(q_cpu / e_cpu)
    new = B * tokens
    e, q = statistics.median(ens_s), statistics.median(peft_s)
    print(f"ensemble generation over N = {N} {kind} experts: "
          f"{B} prompts x {tokens} new tokens, greedy, KV cache, {rounds} rounds, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"  batched ensemble (one forward of {N * B} rows per token): {e:.3f} s, "
          f"{new / e:.1f} ensemble tokens/s")  # fmt: skip
    print(f"  {N} separate PEFT adapter runs (transformers generate): {q:.3f} s, "
          f"{new / q:.1f} ensemble tokens/s ({N * new / q:.1f} adapter tokens/s)")  # fmt: skip
    print(f"  per round, s: ensemble {', '.join(f'{x:.2f}' for x in ens_s)}; "
          f"PEFT {', '.join(f'{x:.2f}' for x in peft_s)}")  # fmt: skip
    print(f"  speed-up of the batched ensemble: {statistics.median(ratios):.2f}x wall "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}), "
          f"{statistics.median(cpu_ratios):.2f}x CPU time "
          f"(per round: {', '.join(f'{r:.2f}' for r in cpu_ratios)}); goal >= 1.5x")  # fmt: skip


def study_generation(ws, preset: str, fits: str | None) -> None:
    """Part 2: the answers' time of every method of `preset` beside its evaluation's."""
    from lorafuse.methods.run import evaluate_method, generate_answers
    from lorafuse.study.config import preset_config

    cfg = preset_config(preset)
    if fits:  # the spec reads `fits` against its own folder: give it absolute
        ws.spec.fits = str(Path(fits).resolve())
    gen, test = cfg.generation, cfg.examples.test
    cap = test if gen.examples is None else min(gen.examples, test or gen.examples)
    print(f"\ngeneration the `{preset}` study adds: {cap} answers per task x "
          f"{len(ws.tasks)} tasks, at most {gen.max_new_tokens} new tokens; test loss on "
          f"{test} examples per task (probability ensembles: from the study's cached "
          "passes, so their eval time here is an upper bound)")  # fmt: skip
    print(f"{'method':<26} {'experts':<8} {'eval s':>8} {'answers s':>10} {'tokens':>7} "
          f"{'exact match':>12}")  # fmt: skip
    total_e = total_a = 0.0
    for m in cfg.method_list():
        try:
            e = timed(lambda m=m: evaluate_method(ws, m.name, "test", m.experts, test))
            t0 = time.perf_counter()
            r = generate_answers(ws, m.name, "test", m.experts, cap, gen.max_new_tokens)
            a = time.perf_counter() - t0
        except Exception as err:  # a method without its fit: say so and go on
            print(f"{m.name:<26} {m.experts:<8} skipped: {str(err).splitlines()[0][:70]}")
            continue
        total_e, total_a = total_e + e, total_a + a
        tokens, em = r["settings"]["generated_tokens"], r["exact_match"]["mean"]
        print(f"{m.name:<26} {m.experts:<8} {e:>8.2f} {a:>10.2f} {tokens:>7} {em:>12.3f}")
    print(f"{'total':<35} {total_e:>8.2f} {total_a:>10.2f}  (answers / eval: "
          f"{total_a / max(total_e, 1e-9):.2f}x)")  # fmt: skip


def main() -> None:
    from lorafuse.spec import load_spec
    from lorafuse.workspace import Workspace

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", default="runs/small")
    ap.add_argument("--experts", default="mbc", help="the ensemble's expert kind")
    ap.add_argument("--fits", default="runs/study/fits", help="a finished study's fits")
    ap.add_argument("--preset", default="small", help="the study preset of part 2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-study", action="store_true", help="part 1 only")
    ap.add_argument("--skip-ensemble", action="store_true", help="part 2 only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    ws = Workspace(load_spec(args.library))
    if not args.skip_ensemble:
        ensemble_vs_peft(ws, args.experts, args.prompts, args.tokens, args.rounds)
    if not args.skip_study:
        study_generation(ws, args.preset, args.fits)


if __name__ == "__main__":
    main()
