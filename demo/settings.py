"""Typed settings of the demo world: what the world holds, how the three models are trained.

The settings (with the seed and `CODE_VERSION`) are hashed to name the cached world, so anything
that changes the built files must live here or bump `CODE_VERSION`.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

# Bump when the generator or training code changes what a given settings object builds.
CODE_VERSION = "8"


class WorldSettings(BaseModel):
    """The synthetic facts and the text that states them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    qa_entities: int = Field(150, ge=4, description="entities with QA in pretraining and in SFT")
    heldout_entities_per_split: int = Field(40, ge=1, description="entities per held-out split")
    uncertain_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # How often an uncertain fact's majority value is stated. With 0.6-0.8 the aligned model was
    # not reliably worse calibrated than the base across seeds (demo/tuning/trials.md).
    majority_probs: tuple[float, ...] = (0.55, 0.6, 0.65, 0.7)
    mentions_per_fact: int = Field(20, ge=1)
    qa_docs_per_fact: int = Field(4, ge=0, description="plain MC questions per QA-entity fact")
    chat_doc_fraction: float = Field(0.05, ge=0.0, le=1.0, description="chat-wrapped sentences")
    # Share of pretraining QA in the chat format (letters drawn from the fact, not the majority).
    # 0: the base learns the chat format only half-way from plain-format quizzes, and SFT adds
    # accuracy on every seed tried. With 0.05-0.25 the base answers well in the chat format and
    # SFT then costs it 0.01-0.05 accuracy on some seeds (demo/tuning/trials.md).
    qa_chat_fraction: float = Field(0.0, ge=0.0, le=1.0)
    sft_questions_per_fact: int = Field(1, ge=1)
    eval_questions_per_fact: int = Field(2, ge=1, description="MC items per held-out fact")
    open_prompts: int = Field(40, ge=1)
    # Open questions (no options, the reply is the value). Plain quizzes in pretraining (values
    # drawn from the fact): 2 per fact changed the base enough that seed 0 failed the MC gap
    # (base ECE 0.205 vs aligned 0.190), so 0; the base learns the chat forms from a short
    # format SFT instead (DemoSettings.base_format_sft). Majority values in the aligned SFT.
    short_docs_per_fact: int = Field(0, ge=0, description="plain short answers per QA fact")
    base_format_per_fact: int = Field(
        4, ge=0, description="chat short answers per QA fact for the base (values in proportion)")
    # Multiple-choice chat questions in the same format SFT. Answers follow each fact's
    # proportions by largest-remainder rounding (`corpus.mentions`): with 2 per fact an uncertain
    # fact's two letters get one each (targets of one half, as 4 open answers get 2:2 or 3:1).
    # 0: the open exchanges pull the base's chat prompt towards value words and away from the
    # letters; on seed 1 the base fell to chance on multiple choice (0.253, ECE 0.388) and the
    # gap check failed. 2 passes seeds 0-3 (demo/tuning/trials.md, "Version 7"); 4 makes the
    # base more accurate than the aligned model on seed 0.
    base_format_mc_per_fact: int = Field(
        2, ge=0, description="chat MC questions per QA fact for the base (letters in proportion)")
    sft_short_per_fact: int = Field(1, ge=0, description="chat short answers per QA fact in SFT")
    # 4 gold draws per question (640 items a split): with 2, the gold draws alone moved the
    # served free-form ECE by about 0.015 (one standard deviation) on the 160 questions of a split.
    short_questions_per_fact: int = Field(
        4, ge=1, description="short-answer items per held-out fact")
    # The long tail: in each held-out split, this share of the entities (the last ones drawn) is
    # never mentioned in the base's pretraining corpus (so neither the base, the aligned model nor
    # their merge has read about them), only in the expert's continued pretraining. A stronger
    # model knows more of the long tail: that is what makes escalating a low-confidence answer
    # pay. With 0 the expert read nothing the others did not and was only about 2 points ahead
    # of the merged model (all of them near the world's ceiling of about 81% on sampled golds).
    long_tail_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="held-out entities only the expert read about")


class ModelSettings(BaseModel):
    """A tiny Llama; head_dim must be 64 for vLLM's CPU attention kernels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256


class PretrainSettings(BaseModel):
    """Plain next-token pretraining on packed sequences."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(1200, ge=1)
    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(64, ge=8)
    # 5e-3 never learnt to route the entity to the answer position (QA stayed at chance).
    lr: float = 2e-3
    warmup_steps: int = Field(100, ge=0)
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.1


class SFTSettings(BaseModel):
    """Chat-format supervised fine-tuning on majority answers (loss on the answer and `<|end|>`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = 1e-3
    weight_decay: float = 0.0


class DemoSettings(BaseModel):
    """Everything that determines a demo world (together with the seed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    world: WorldSettings = WorldSettings()
    model: ModelSettings = ModelSettings()
    pretrain: PretrainSettings = PretrainSettings()
    # 30 epochs: the ECE ratio's worst seed (of 0-2) goes from 1.65x to 1.85x.
    sft: SFTSettings = SFTSettings(epochs=30)
    # The base's chat formats: chat short answers and chat multiple-choice questions on the QA
    # entities with values (letters) in the fact's proportions, rounded (not the majority ones
    # alone), after pretraining. Without it the base never answers an open chat question
    # with a value, and the merge has a cliff: at lambda 0.2 3% of open answers were values, at
    # 0.3 97% (old base, demo/tuning/trials.md).
    base_format_sft: SFTSettings | None = SFTSettings(epochs=2)
    # The expert continues the base's pretraining for more steps on the whole corpus (the base's
    # plus the long-tail entities', WorldSettings.long_tail_fraction), then gets SFT (20 epochs).
    expert_extra_steps: int = Field(1200, ge=0)
    expert_sft: SFTSettings = SFTSettings()
    # The build fails unless aligned ECE >= ratio * base ECE and aligned accuracy >= base's.
    min_ece_ratio: float = 1.5
    check_gap: bool = True
    threads: int = Field(1, ge=1, description="torch threads; fixed so weights are reproducible")

    def digest(self, seed: int) -> str:
        """Short stable hash of settings + seed + code version: the cache key."""
        payload = json.dumps(
            {"settings": self.model_dump(mode="json"), "seed": seed, "code": CODE_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tiny_settings() -> DemoSettings:
    """A world that builds in seconds, for tests of the machinery (not of the calibration gap)."""
    return DemoSettings(
        world=WorldSettings(
            qa_entities=8, heldout_entities_per_split=3, mentions_per_fact=4, qa_docs_per_fact=1,
            eval_questions_per_fact=1, open_prompts=4,
        ),
        pretrain=PretrainSettings(steps=20, batch_size=8, seq_len=32, warmup_steps=2),
        sft=SFTSettings(epochs=1, batch_size=8),
        expert_extra_steps=10,
        expert_sft=SFTSettings(epochs=1, batch_size=8),
        check_gap=False,
    )
