r"""Compress a model (prune and/or quantize), optionally recover, and evaluate against the dense model.

  python -m experiments.compress --model=smollm2-135m --prune=wanda --sparsity=2:4 \
      --calib_data=python-docs --calib_samples=64 --calib_seqlen=512 \
      --eval_data=python-docs,shakespeare --eval_windows=40 --out_dir=results/wanda24

  python -m experiments.compress --quant=gptq --bits=3 --group_size=128 \
      --recover=eora --rank=64 --out_dir=results/gptq3_eora64

Expect a few minutes on 2 CPU cores for SmolLM2-135M (64 x 512 calibration tokens). Evaluates the
dense and the compressed (and recovered) model on the same windows and writes ``results.json``
(``ppl_dense``, ``ppl_compressed``, ``kl_compressed``, ``top1_compressed``, ``probe_acc_*``,
``compress_seconds``, ``*_recovered`` with ``--recover``, the per-layer report, all flags) and
``table.md``. Finished blocks are checkpointed under ``OUT_DIR/checkpoint``: rerunning the same
command after an interruption resumes there. ``--save`` writes an orbax checkpoint of the result.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from experiments import common
from experiments.compress_lib import CompressConfig, RESULT_COLUMNS, build_spec, run


def config_from_flags() -> CompressConfig:
  return CompressConfig(
      model=FLAGS.model, prune=FLAGS.prune, sparsity=FLAGS.sparsity, quant=FLAGS.quant,
      bits=FLAGS.bits, group_size=FLAGS.group_size, act_order=FLAGS.act_order,
      static_groups=FLAGS.static_groups, sym=FLAGS.sym, awq_clip=FLAGS.awq_clip,
      true_sequential=FLAGS.true_sequential, dense_inputs=FLAGS.dense_inputs, rules=tuple(FLAGS.rules),
      auto_bits=FLAGS.auto_bits, auto_candidates=tuple(int(b) for b in FLAGS.auto_candidates),
      include_head=FLAGS.include_head, calib_data=FLAGS.calib_data,
      calib_samples=FLAGS.calib_samples, calib_seqlen=FLAGS.calib_seqlen, seed=FLAGS.seed,
      eval_data=tuple(common.split_list(FLAGS.eval_data)), eval_seqlen=FLAGS.eval_seqlen,
      eval_windows=FLAGS.eval_windows, probes=FLAGS.probes, dtype=FLAGS.dtype,
      batch_size=FLAGS.batch_size, recover=FLAGS.recover, rank=FLAGS.rank,
      adapter_bits=FLAGS.adapter_bits, srr_k=FLAGS.srr_k, recover_data=FLAGS.recover_data,
      recover_samples=FLAGS.recover_samples, reconstruct=FLAGS.reconstruct,
      recon_samples=FLAGS.recon_samples, recon_epochs=FLAGS.recon_epochs, recon_lr=FLAGS.recon_lr,
      recon_batch=FLAGS.recon_batch, recon_inputs=FLAGS.recon_inputs, recon_loss=FLAGS.recon_loss,
      recon_quant_mode=FLAGS.recon_quant_mode, recon_peft=FLAGS.recon_peft,
      finetune=FLAGS.finetune, ft_steps=FLAGS.ft_steps, ft_samples=FLAGS.ft_samples,
      ft_lr=FLAGS.ft_lr, ft_distill=FLAGS.ft_distill, lora_rank=FLAGS.lora_rank,
      lora_init=FLAGS.lora_init, idp_prompts=FLAGS.idp_prompts)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so modules import side-effect free)."""
  flags.DEFINE_string('model', 'smollm2-135m', 'Model name, checkpoint directory or .gguf.')
  flags.DEFINE_string('prune', 'none', 'none|magnitude|wanda|sparsegpt')
  flags.DEFINE_string('sparsity', '0.5', 'Unstructured ratio in (0, 1), or N:M (2:4, 4:8).')
  flags.DEFINE_string('quant', 'none', 'none|rtn|gptq|awq')
  flags.DEFINE_integer('bits', 4, 'Weight bits: 2, 3, 4 or 8.')
  flags.DEFINE_integer('group_size', 128, 'Quantization group size (-1: per output unit).')
  flags.DEFINE_bool('act_order', False, 'GPTQ act-order.')
  flags.DEFINE_bool('static_groups', False, 'GPTQ static groups.')
  flags.DEFINE_bool('sym', False, 'Symmetric quantization grid.')
  flags.DEFINE_bool('awq_clip', False, "AWQ's clipping search.")
  flags.DEFINE_bool('true_sequential', False, 'Re-collect statistics inside a block.')
  flags.DEFINE_bool('dense_inputs', False, 'Calibrate on dense activations.')
  flags.DEFINE_list('rules', [], 'Mixed precision: REGEX=BITS or REGEX=none rules, first '
                             'match wins, ahead of the uniform spec.')
  flags.DEFINE_float('auto_bits', None, 'Allot bits per layer from measured '
                                  'sensitivity under this average-bits budget.')
  flags.DEFINE_list('auto_candidates', ['2', '3', '4'], 'Bit widths for --auto_bits.')
  flags.DEFINE_bool('include_head', False, 'Also compress the LM head.')
  flags.DEFINE_string('calib_data', 'python-docs', 'Calibration corpus or file (train split).')
  flags.DEFINE_integer('calib_samples', 64, 'Calibration sequences.')
  flags.DEFINE_integer('calib_seqlen', 512, 'Calibration sequence length.')
  flags.DEFINE_integer('seed', 0, 'Seed of the calibration sampler.')
  flags.DEFINE_string('eval_data', 'python-docs', 'Comma list of corpora or files (test split).')
  flags.DEFINE_integer('eval_seqlen', 512, 'Evaluation window length.')
  flags.DEFINE_integer('eval_windows', 40, 'Evaluation windows per corpus.')
  flags.DEFINE_string('probes', None, "Multiple-choice JSONL (default: shipped probes; 'none').")
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
  flags.DEFINE_integer('batch_size', 8, 'Sequences per calibration/evaluation step.')
  flags.DEFINE_string('recover', 'none', 'none|svd|eora|actsvd|srr')
  flags.DEFINE_integer('rank', 64, 'Adapter rank.')
  flags.DEFINE_integer('adapter_bits', 16, 'Adapter bits: 16 (float), 8, 4, 3.')
  flags.DEFINE_integer('srr_k', None, 'SRR preserved rank (default energy rule; -1 search).')
  flags.DEFINE_string('recover_data', None, 'Separate calibration set for recovery.')
  flags.DEFINE_integer('recover_samples', 64, 'Recovery calibration sequences.')
  flags.DEFINE_string('reconstruct', 'none', 'Local reconstruction window: none|matrix|submodule|'
                      'block|blocks:K.')
  flags.DEFINE_integer('recon_samples', 128, 'Reconstruction sequences (calibration corpus).')
  flags.DEFINE_float('recon_epochs', 1.0, 'Epochs over the reconstruction set per window.')
  flags.DEFINE_float('recon_lr', 1e-5, 'AdamW learning rate (10% warmup, linear decay).')
  flags.DEFINE_integer('recon_batch', 2, 'Reconstruction batch (sequences).')
  flags.DEFINE_string('recon_inputs', 'propagated', 'propagated|dense inputs of each window.')
  flags.DEFINE_string('recon_loss', 'mse', 'mse|cosine')
  flags.DEFINE_string('recon_quant_mode', 'scales', 'What a quantized weight trains: scales|ste|lora')
  flags.DEFINE_bool('recon_peft', False, 'Train a LoRA (r16, alpha 32) per window and merge it.')
  flags.DEFINE_string('finetune', 'none', 'none|lora|qat|global|idp')
  flags.DEFINE_integer('ft_steps', 100, 'Fine-tuning steps.')
  flags.DEFINE_integer('ft_samples', 128, 'Fine-tuning sequences (calibration corpus).')
  flags.DEFINE_float('ft_lr', None, 'Fine-tuning learning rate (default per method).')
  flags.DEFINE_bool('ft_distill', False, 'Distil from the dense model instead of the LM loss.')
  flags.DEFINE_integer('lora_rank', 16, 'LoRA rank.')
  flags.DEFINE_string('lora_init', 'zero', 'LoRA init: zero (QLoRA)|loftq|eora|srr')
  flags.DEFINE_integer('idp_prompts', 2, 'IDP: prompts in the pool (k-means groups).')
  flags.DEFINE_string('save', None, 'Write an orbax checkpoint of the compressed model here.')
  flags.DEFINE_string('out_dir', None, 'Output directory.')
  flags.DEFINE_bool('restart', False, 'Ignore an existing pipeline checkpoint in OUT_DIR.')


def main(argv: Sequence[str]):
  del argv
  common.quiet_logs()
  if not FLAGS.out_dir:
    raise app.UsageError('--out_dir is required')
  c = config_from_flags()
  try:
    build_spec(c)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  results = run(c, out_dir=FLAGS.out_dir, save=FLAGS.save, restart=FLAGS.restart)
  cols = [k for k in RESULT_COLUMNS if k in results]
  common.write_results(FLAGS.out_dir, results, rows=[results], columns=cols,
                       flags=common.flag_values(flags.FLAGS), title=f'{results["method"]} on {c.model}')
  print(common.markdown_table([results], cols))
  print(f'wrote {FLAGS.out_dir}/results.json')


if __name__ == '__main__':
  define_flags()
  app.run(main)
