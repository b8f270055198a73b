"""Multiple-choice scoring on SmolLM2-135M: the old path (one request per choice, LM head and
log-softmax at every position: (batch, width, vocab)) against today's (head on answer tokens
only, scaleot_fed.heads; each shared context encoded once where that pays, scaleot_fed.packing).

    python benchmarks/evaluate_speed.py [--tasks piqa hellaswag --items 40 --repeats 3 --check-items 200]

Per task: items/s of both (median of paired repeats, interleaved so machine noise hits both),
their ratio next to the FLOP ideal computed from the model's shapes, the roofline (this machine's
measured matmul FLOP/s over the new path's FLOPs per item), and acc / acc_norm of both paths on
the first ``--check-items`` items (lm-eval's --limit). Writes benchmarks/results/evaluate_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)

import torch  # noqa: E402

from scaleot_fed.evaluate import (  # noqa: E402
    TARGET_DELIMITER,
    accuracy_from_scores,
    choice_loglikelihoods,
    make_request,
    model_max_length,
    packing_plan,
    pad_right,
)
from scaleot_fed.models import load_model  # noqa: E402
from scaleot_fed.tasks import load_task  # noqa: E402


@torch.no_grad()
def loglikelihoods_full_head(model, tokenizer, pairs, batch_size: int = 8) -> list[float]:
    """The path before scaleot_fed.heads: logits and log-softmax at every position."""
    max_length = model_max_length(model)
    built = [make_request(tokenizer, c, x, max_length) for c, x in pairs]
    order = sorted(range(len(built)), key=lambda i: -len(built[i][0].input_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    scores = [0.0] * len(built)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_right([built[i][0].input_ids for i in chunk], pad)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        for row, i in enumerate(chunk):
            request, targets = built[i]
            n = len(request.input_ids)
            rows = logprobs[row, n - request.cont_len : n]  # (cont_len, vocab)
            scores[i] = float(rows.gather(1, torch.tensor(targets)[:, None]).sum())
    return scores


def _decoder_flops(cfg, decoder_params: int, queries_keys: list[tuple[int, int]]) -> float:
    """FLOPs of the decoder for ``(query positions, keys each sees summed)`` segments: weights
    2 x params per position, attention scores and mixing 2 x 2 x hidden per query-key pair."""
    positions = sum(q for q, _ in queries_keys)
    pairs = sum(k for _, k in queries_keys)
    return 2 * decoder_params * positions + 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * pairs


def flops(model, tokenizer, items) -> dict:
    """FLOPs of the old path (one request per choice, head at every position) and the new one
    (head on answer tokens; each shared context once where the new path packs)."""
    cfg = model.config
    head = 2 * cfg.hidden_size * cfg.vocab_size
    decoder_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    max_length = model_max_length(model)
    requests = [make_request(tokenizer, i.context, TARGET_DELIMITER + c, max_length)[0] for i in items for c in i.choices]
    per_request = [(len(r.input_ids), len(r.input_ids) * (len(r.input_ids) + 1) // 2) for r in requests]
    positions = sum(len(r.input_ids) for r in requests)
    answer = sum(r.cont_len for r in requests)
    old = _decoder_flops(cfg, decoder_params, per_request) + head * positions
    groups = [(i.context, [TARGET_DELIMITER + c for c in i.choices]) for i in items]
    plan = packing_plan(model, tokenizer, groups, max_length)  # what the new path does, group by group
    segments, k = [], 0
    for p, (_, continuations) in zip(plan, groups):
        if p is None:  # one request per continuation, as the old path
            segments += per_request[k : k + len(continuations)]
        else:  # context causally, then each choice's tokens see the context and their own prefix
            n = len(p.context)
            segments.append((n, n * (n + 1) // 2))
            segments += [(len(c) - 1, sum(n + j + 1 for j in range(len(c) - 1))) for c in p.choices]
        k += len(continuations)
    new = _decoder_flops(cfg, decoder_params, segments) + head * answer
    return {"old": old, "new": new, "packed": any(p is not None for p in plan), "head_share_old": head * positions / old,
            "positions_old": positions, "answer_positions": answer}


def gemm_rate(cfg, repeats: int = 50) -> float:
    """Measured FLOP/s of this machine on the model's own MLP matmul at a scoring batch's row
    count: the roofline no scoring path can pass."""
    a, b = torch.randn(512, cfg.hidden_size), torch.randn(cfg.hidden_size, cfg.intermediate_size)
    for _ in range(5):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * repeats / (time.perf_counter() - start)


def accuracy(model, tok, items, scorer, batch_size) -> dict:
    groups = [(i.context, [TARGET_DELIMITER + c for c in i.choices]) for i in items]
    if scorer == "old":
        pairs = [(c, x) for c, xs in groups for x in xs]
        flat = iter(loglikelihoods_full_head(model, tok, pairs, batch_size))
        scores = [[next(flat) for _ in xs] for _, xs in groups]
    else:
        scores = choice_loglikelihoods(model, tok, groups, batch_size)
    return accuracy_from_scores(items, scores), scores


def bench_task(model, tok, task: str, args) -> dict:
    items = load_task(task, "validation", args.items)
    groups = [(i.context, [TARGET_DELIMITER + c for c in i.choices]) for i in items]
    pairs = [(c, x) for c, xs in groups for x in xs]
    times = {"old": [], "new": []}
    for _ in range(args.repeats):  # paired and interleaved
        start = time.perf_counter()
        loglikelihoods_full_head(model, tok, pairs, batch_size=args.batch_size)
        times["old"].append(time.perf_counter() - start)
        start = time.perf_counter()
        choice_loglikelihoods(model, tok, groups, batch_size=args.batch_size)
        times["new"].append(time.perf_counter() - start)
    speed = {k: len(items) / statistics.median(v) for k, v in times.items()}
    cost = flops(model, tok, items)
    check_items = load_task(task, "validation", args.check_items)
    (old_acc, old_scores), (new_acc, new_scores) = (accuracy(model, tok, check_items, s, args.batch_size)
                                                    for s in ("old", "new"))
    diff = max(abs(a - b) for x, y in zip(old_scores, new_scores) for a, b in zip(x, y))
    roofline = gemm_rate(model.config) / (cost["new"] / len(items))
    return {"task": task, "items": len(items), "choices": len(items[0].choices), "items_per_s": speed,
            "ratio": speed["new"] / speed["old"], "flop_ideal_ratio": cost["old"] / cost["new"],
            "roofline_items_per_s": roofline, "flops": cost, "seconds": times,
            "check": {"n": len(check_items), "old": old_acc, "new": new_acc, "max_abs_loglik_diff": diff}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["piqa", "hellaswag"])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--check-items", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="default: every core, as the CLI")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    results = [bench_task(model, tok, task, args) for task in args.tasks]
    print(f"SmolLM2-135M, float32, {torch.get_num_threads()} threads; median of {args.repeats} paired repeats "
          f"on the first {args.items} items; acc on the first {args.check_items}")
    print(f"{'task':10} {'old it/s':>9} {'new it/s':>9} {'ratio':>7} {'FLOP ideal':>11} {'roofline it/s':>14}"
          f" {'packed':>7}   acc / acc_norm old -> new")
    for r in results:
        c = r["check"]
        print(f"{r['task']:10} {r['items_per_s']['old']:9.2f} {r['items_per_s']['new']:9.2f} {r['ratio']:6.2f}x"
              f" {r['flop_ideal_ratio']:10.2f}x {r['roofline_items_per_s']:14.2f} {str(r['flops']['packed']):>7}"
              f"   {c['old']['acc']:.3f} / {c['old']['acc_norm']:.3f} -> {c['new']['acc']:.3f} / {c['new']['acc_norm']:.3f}"
              f"  (largest log-likelihood difference {c['max_abs_loglik_diff']:.1e})")
    out = Path(__file__).resolve().parent / "results" / "evaluate_speed.json"
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                                          f"{torch.__version__}", "batch_size": args.batch_size, "tasks": results},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
