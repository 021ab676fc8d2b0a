"""`calibserve tune`: supervised fine-tuning of a checkpoint, sized to run on a laptop CPU.

Chat or eval-item data rendered with the model's chat template, loss and logits only on the
reply tokens, the embedding frozen by default, bf16 autocast where the hardware has it, LoRA or
full fine-tuning, resumable, and a complete Hugging Face checkpoint written atomically with
`train_info.json`. Modules: `config` (settings), `templates`, `data` (records, tokenizing,
batches), `reply_loss`, `model`, `objective` (plain SFT or the calibration-aware objective),
`trainer` (the loop), `resume`, `checkpoint`, `info`, `pipeline` (one run), `cli`.

Depends on `calibserve.calibration` (the multiple-choice wording and option-letter reading
shared with merge and the server) and the leaf `calibserve.publish`; nothing else of ours.
"""
