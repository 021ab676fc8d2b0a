"""A peer's harness as a client (issue 14, item 3): EleutherAI's lm-evaluation-harness run
in-process against vLLM directly and through calibserve, on two small tasks built from the demo
world's multiple-choice test items.

- `local-completions`, `multiple_choice`: the log-likelihood of each option letter after the
  rendered prompt (echo + logprobs, lm-eval tokenizing with the model's own HF tokenizer).
- `local-chat-completions`, `generate_until`: greedy generation through the chat template,
  `exact_match` on the letter.

Floor: identical metrics both ways, and per-sample results equal (log-likelihoods to 1e-6).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from calibserve.demo.chat import LETTERS, format_mc_prompt, render_prompt
from calibserve.testing.fixtures import require
from tests.server.fidelity import MODEL
from tests.server.test_fidelity import calibserve, engine  # noqa: F401  (shared fixtures)

try:
    import lm_eval
    import lm_eval.tasks
except ImportError:  # a skip here, a failure in CI (calibserve.testing.fixtures `require`)
    lm_eval = None

pytestmark = pytest.mark.vllm

LIMIT = 40
MC_TASK = "calibserve_demo_mc"
GEN_TASK = "calibserve_demo_gen"

MC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: letters
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

GEN_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{user}}}}"
doc_to_target: "{{{{letter}}}}"
generation_kwargs:
  until: ["<|end|>"]
  max_gen_toks: 2
  temperature: 0
  do_sample: false
filter_list:
  - name: letter
    filter:
      - function: regex
        regex_pattern: "([A-H])"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two task YAMLs and a local JSONL of LIMIT test items spread over the split."""
    require(lm_eval is not None, "lm-eval (the test extra) is not installed")
    out = tmp_path_factory.mktemp("lm-eval-tasks")
    lines = (demo_dir / "data" / "test.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    step = max(1, len(items) // LIMIT)
    rows = []
    for item in items[::step][:LIMIT]:
        user = format_mc_prompt(item)
        letters = list(LETTERS[: len(item["choices"])])
        rows.append({"user": user, "prompt": render_prompt(user), "letters": letters,
                     "answer": item["answer"], "letter": letters[item["answer"]]})
    assert len(rows) == LIMIT
    data = out / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{MC_TASK}.yaml").write_text(MC_YAML.format(task=MC_TASK, data=data))
    (out / f"{GEN_TASK}.yaml").write_text(GEN_YAML.format(task=GEN_TASK, data=data))
    return out


def evaluate(task_dir: Path, base: str, model: str, task: str, extra: str = "",
             **kwargs: Any) -> dict[str, Any]:
    endpoint = "completions" if model == "local-completions" else "chat/completions"
    model_args = f"model={MODEL},base_url={base}/v1/{endpoint},num_concurrent=1,max_retries=1"
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args + extra, tasks=[task],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir)),
        limit=LIMIT, log_samples=True, bootstrap_iters=0, **kwargs)


def metrics(result: dict[str, Any], task: str) -> dict[str, float]:
    return {k: v for k, v in result["results"][task].items()
            if isinstance(v, float) and "stderr" not in k}


def by_doc(result: dict[str, Any], task: str) -> dict[int, Any]:
    return {s["doc_id"]: s for s in result["samples"][task]}


def test_loglikelihood_scores_are_identical(
    task_dir: Path, merged_dir: Path, engine: str, calibserve: Any  # noqa: F811
) -> None:
    extra = f",tokenizer_backend=huggingface,tokenizer={merged_dir / 'model'}"
    direct = evaluate(task_dir, engine, "local-completions", MC_TASK, extra, batch_size=8)
    via = evaluate(task_dir, calibserve.url, "local-completions", MC_TASK, extra, batch_size=8)
    print(f"lm-eval {MC_TASK}: direct {metrics(direct, MC_TASK)} "
          f"calibserve {metrics(via, MC_TASK)}")
    assert metrics(direct, MC_TASK) == metrics(via, MC_TASK)
    d, v = by_doc(direct, MC_TASK), by_doc(via, MC_TASK)
    assert sorted(d) == sorted(v) and len(d) == LIMIT
    for doc_id, sample in d.items():
        ours = [r[0] for r in sample["resps"]]
        theirs = [r[0] for r in v[doc_id]["resps"]]
        assert len(ours) == len(theirs) == len(sample["doc"]["letters"])
        for (ll_d, greedy_d), (ll_v, greedy_v) in zip(ours, theirs, strict=True):
            assert math.isfinite(ll_d) and ll_d < 0
            assert ll_d == pytest.approx(ll_v, abs=1e-6) and greedy_d == greedy_v
    # real scores: the merged model beats chance (1 / 4 choices) on its own test items
    assert metrics(direct, MC_TASK)["acc,none"] > 0.3


def test_generation_scores_are_identical(
    task_dir: Path, engine: str, calibserve: Any  # noqa: F811
) -> None:
    direct = evaluate(task_dir, engine, "local-chat-completions", GEN_TASK,
                      apply_chat_template=True)
    via = evaluate(task_dir, calibserve.url, "local-chat-completions", GEN_TASK,
                   apply_chat_template=True)
    print(f"lm-eval {GEN_TASK}: direct {metrics(direct, GEN_TASK)} "
          f"calibserve {metrics(via, GEN_TASK)}")
    assert metrics(direct, GEN_TASK) == metrics(via, GEN_TASK)
    d, v = by_doc(direct, GEN_TASK), by_doc(via, GEN_TASK)
    assert sorted(d) == sorted(v) and len(d) == LIMIT
    assert all(d[i]["resps"] == v[i]["resps"] for i in d), "generations differ"
    assert metrics(direct, GEN_TASK)["exact_match,letter"] > 0.3


def test_the_tokenizer_backend_lm_eval_detects_is_the_same(
    engine: str, calibserve: Any  # noqa: F811
) -> None:
    """`tokenizer_backend=auto` (lm-eval's default) probes /tokenizer_info and /tokenize: the
    answer through calibserve is the engine's, so lm-eval tokenizes the same way both ways."""
    require(lm_eval is not None, "lm-eval (the test extra) is not installed")
    from lm_eval.utils import check_remote_tokenizer_support

    for endpoint in ("completions", "chat/completions"):
        direct = check_remote_tokenizer_support(f"{engine}/v1/{endpoint}", max_retries=1)
        via = check_remote_tokenizer_support(f"{calibserve.url}/v1/{endpoint}", max_retries=1)
        print(f"lm-eval remote tokenizer support ({endpoint}): direct {direct} calibserve {via}")
        assert direct == via
