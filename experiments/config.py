"""The main job's configuration: the fields of ``CompressConfig`` (each one a flag of
``experiments.compress``, with its help), what the flags derive (the uniform spec, the rules, the
reconstruction settings) and :func:`validate`, the check of everything knowable before any work:
the flags, the model's config (not its weights), the text files and the output paths."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
import tempfile
from typing import Any, Collection

from compress import matrix as matrix_lib
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import common
from kernels import SUPPORTED_BITS, QuantSpec
from models import checkpoint
from models import data as data_lib
from models import distributed
from models import export as export_lib
from models import llama
from models import loading
from models import sharding
from recover import compensate as compensate_lib
from recover import prompting
from recover import reconstruct as reconstruct_lib
from recover import train as train_lib

FINETUNE_METHODS = ('none', 'lora', 'qat', 'global', 'idp')
LORA_INITS = ('zero', 'loftq', 'eora', 'srr')


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressConfig:
  """Everything ``run`` needs, and the single declaration of ``experiments.compress``'s flags: each
  field is a flag of the same name, default and help (``common.define_flags_from``)."""
  model: str = common.flag_field('smollm2-135m', 'Model name, checkpoint directory or .gguf.')
  prune: str = common.flag_field(
      'none', 'Pruning method: none|magnitude|wanda|wanda++|sparsegpt (wanda++: Wanda with '
      'regional gradients, --wandapp_alpha).')
  sparsity: str = common.flag_field('0.5', 'Unstructured ratio in (0, 1), or N:M (2:4, 4:8).')
  quant: str = common.flag_field('none', 'Quantization method: none|rtn|gptq|awq.')
  bits: int = common.flag_field(4, 'Weight bits: 2, 3, 4 or 8.')
  group_size: int | None = common.flag_field(
      None, 'Quantization group size (-1: per output unit). Default: 128, or the largest of '
      '128/64/32 that divides the input width of every block linear (64 on SmolLM2-135M, whose '
      'widths are 576 and 1536); results.json records the one used.')
  act_order: bool = common.flag_field(False, 'GPTQ act-order.')
  static_groups: bool = common.flag_field(False, 'GPTQ static groups.')
  asymmetric: bool = common.flag_field(
      False, 'GPTAQ (asymmetric calibration) for --quant=gptq and --prune=sparsegpt: fit the '
      'compressed model\'s inputs to the dense model\'s outputs (carries the dense activations '
      'too; not with --dense_inputs).')
  wandapp_alpha: float = common.flag_field(
      100.0, "Wanda++'s weight of the regional gradient in its score (the paper's 100).")
  sym: bool = common.flag_field(False, 'Symmetric quantization grid.')
  awq_clip: bool = common.flag_field(False, "AWQ's clipping search.")
  true_sequential: bool = common.flag_field(False, 'Re-collect statistics inside a block.')
  dense_inputs: bool = common.flag_field(False, 'Calibrate on dense activations.')
  moe_calibration: str = common.flag_field(
      'routed', "Mixture of experts: each expert's statistics from the tokens routed to it, or "
      'from every token of the block.', choices=('routed', 'all_tokens'))
  moe_min_tokens: int = common.flag_field(
      16, 'An expert that receives fewer routed calibration tokens is starved (reported and '
      'handled by --moe_starved).')
  moe_starved: str = common.flag_field(
      'all_tokens', 'A starved expert: calibrate it on every token of the block, or compress it '
      'without data (RTN / magnitude).', choices=('all_tokens', 'rtn'))
  rules: tuple[str, ...] = common.flag_field(
      (), 'Mixed precision: REGEX=BITS or REGEX=none rules, first match wins, ahead of the '
      'uniform spec.')
  auto_bits: float | None = common.flag_field(
      None, 'Allot bits per layer from measured sensitivity under this average-bits budget.')
  auto_candidates: tuple[int, ...] = common.flag_field((2, 3, 4), 'Bit widths for --auto_bits.')
  include_head: bool = common.flag_field(False, 'Also compress the LM head.')
  calib_data: str = common.flag_field(
      'python-docs', 'Calibration source: python-docs|shakespeare|wikitext2|c4 (train split; the '
      'last two need the Hugging Face hub), a local .txt, .jsonl (a "text" field per line) or '
      '.parquet ("text" column) file (the whole file), sampled at random offsets (--seed); or a '
      '.npy of token windows [n, --calib_seqlen] (integer ids) whose first rows are used as they '
      'are: no sampling, --seed does not apply.')
  calib_samples: int = common.flag_field(
      64, 'Calibration sequences (of a .npy: its first rows; it must hold this many).')
  calib_seqlen: int = common.flag_field(
      512, 'Calibration sequence length (of a .npy: must equal its second dimension).')
  seed: int = common.flag_field(
      0, 'Seed of the calibration sampler (not used by a .npy of windows) and of training.')
  eval_data: tuple[str, ...] = common.flag_field(
      ('python-docs',), 'Comma list of evaluation sources: corpora (test split) or local .txt, '
      '.jsonl, .parquet files (the whole file), windowed from the start; or .npy files of token '
      'windows [n, --eval_seqlen] whose rows are the windows, as they are.')
  eval_seqlen: int = common.flag_field(
      512, 'Evaluation window length (of a .npy: must equal its second dimension).')
  eval_windows: int = common.flag_field(
      40, 'Evaluation windows per corpus (-1: all; of a .npy: its first rows).')
  probes: str | None = common.flag_field(
      None, "Multiple-choice JSONL (default: shipped probes; 'none').")
  dtype: str = common.flag_field('float32', 'Compute dtype.', choices=('float32', 'bfloat16'))
  batch_size: int = common.flag_field(8, 'Sequences per calibration/evaluation step.')
  recover: str = common.flag_field('none', 'Recovery method: none|svd|eora|actsvd|srr.')
  rank: int = common.flag_field(64, 'Adapter rank.')
  adapter_bits: int = common.flag_field(16, 'Adapter bits: 16 (float), 8, 4, 3.')
  srr_k: int | None = common.flag_field(
      None, 'SRR preserved rank (default energy rule; -1 search).')
  eora_shrink: float = common.flag_field(
      0.0, 'Robust EoRA (--recover=eora): the eigenspace of H + lambda tr(H)/d I with this lambda '
      '(0: EoRA as published; larger trades in-domain accuracy for out-of-domain, plain SVD in '
      'the limit; 0.1 keeps most of the in-domain gain and removes the out-of-domain loss on '
      'SmolLM2). See results/eora_robust_auto.')
  rank_budget: str = common.flag_field(
      'uniform', 'uniform: every linear gets --rank; global: the adapter parameters of --rank on '
      'every linear, allotted model-wide to the linears whose EoRA components remove the most '
      'output error per parameter (--recover=eora, or srr: there each linear\'s preserved k '
      'too, from --srr_k or the search set; ranks recorded and exported as rank_pattern; on '
      'SmolLM2 it did not beat uniform: results/eora_robust_budget, results/srr_global).',
      choices=('uniform', 'global'))
  budget_max_rank: int = common.flag_field(
      0, '--rank_budget=global: the largest rank one linear may get (0: 4 x --rank).')
  budget_weighting: str = common.flag_field(
      'absolute', '--rank_budget=global: weigh the layers\' output errors as they are (absolute) '
      'or relative to each layer\'s dense output energy ||X W||^2 (relative).',
      choices=('absolute', 'relative'))
  recover_data: str | None = common.flag_field(
      None, 'Separate calibration source for recovery, of the kinds --calib_data takes (a .npy: '
      'windows [n, --calib_seqlen], its first --recover_samples rows).')
  recover_samples: int = common.flag_field(64, 'Recovery calibration sequences.')
  reconstruct: str = common.flag_field(
      'none', 'Local reconstruction window: none|matrix|submodule|block|blocks:K.')
  recon_samples: int = common.flag_field(128, 'Reconstruction sequences (calibration corpus).')
  recon_epochs: float = common.flag_field(1.0, 'Epochs over the reconstruction set per window.')
  recon_lr: float = common.flag_field(
      3e-4, 'AdamW learning rate (10% warmup, linear decay). The paper uses 1e-5, which closes a '
      'third of the Wanda 2:4 gap to dense on SmolLM2 at these defaults; 3e-4 two thirds '
      '(results/recon_defaults).')
  recon_batch: int = common.flag_field(2, 'Reconstruction batch (sequences).')
  recon_inputs: str = common.flag_field('propagated', 'propagated|dense inputs of each window.')
  recon_loss: str = common.flag_field('mse', 'Reconstruction loss: mse|cosine.')
  recon_quant_mode: str = common.flag_field(
      'scales', 'What a quantized weight trains: scales|ste|lora.')
  recon_peft: bool = common.flag_field(
      False, 'Train a LoRA (r16, alpha 32) per window and merge it.')
  recon_train: str = common.flag_field(
      'all', 'What reconstruction trains: all (the compressed linears, as the paper) or adapters '
      '(only the low-rank adapters: those of --recover, or a zero-product LoRA of --rank where a '
      'linear has none; the compressed weights stay fixed and the adapters stay adapters; with '
      '--adapter_bits below 16 they are quantized after the reconstruction).',
      choices=('all', 'adapters'))
  finetune: str = common.flag_field('none', 'Fine-tuning method: none|lora|qat|global|idp.')
  ft_steps: int = common.flag_field(100, 'Fine-tuning steps.')
  ft_samples: int = common.flag_field(128, 'Fine-tuning sequences (calibration corpus).')
  ft_lr: float | None = common.flag_field(None, 'Fine-tuning learning rate (default per method).')
  ft_distill: bool = common.flag_field(False, 'Distil from the dense model instead of the LM loss.')
  lora_rank: int = common.flag_field(16, 'LoRA rank.')
  lora_init: str = common.flag_field('zero', 'LoRA init: zero (QLoRA)|loftq|eora|srr.')
  idp_prompts: int = common.flag_field(2, 'IDP: prompts in the pool (k-means groups).')
  compressed: str | None = common.flag_field(
      None, 'Take the compressed linears from this checkpoint instead of compressing: a GPTQ or '
      'compressed-tensors directory made by another tool, or a --save directory of this model. '
      '--recover, --reconstruct, --finetune and the evaluation run on them, with --model as the '
      'dense model they came from.')
  export: str = common.flag_field(
      'none', 'Also export the result for other tools, to OUT_DIR/export_FORMAT: none|hf (dense '
      'safetensors, adapters merged)|gptq|compressed-tensors (packed low-bit / 2:4 weights, no '
      'adapters)|peft (base + adapters); see experiments.export.',
      choices=('none',) + export_lib.FORMATS)
  peft_base: str = common.flag_field(
      'hf', 'With --export=peft: the format of the base the adapters attach to.',
      choices=export_lib.PEFT_BASES)
  checkpoint_every_s: float = common.flag_field(
      60.0, 'Save resumable state (compression, reconstruction, fine-tuning) at most this often, '
      'in seconds, and at the end of each stage; 0: after every block, window or chunk.')
  mesh: str | None = common.flag_field(
      None, 'Device mesh data:N,model:M over all devices (default: every device on data): '
      'calibration, evaluation and training batches split along data, the output columns of '
      'each compressed matrix along model.')
  offload: str = common.flag_field(
      'none', 'Where the activations between blocks live: none (on the devices)|host (host '
      'memory; each batch moves to the devices when used).', choices=sharding.OFFLOADS)
  param_sharding: str = common.flag_field(
      'replicated', 'How training (--reconstruct, --finetune) places the parameters and optimizer '
      'state on the mesh: replicated (whole on every device; data parallel)|fsdp (fully sharded: '
      'each large array split along the data axis, gathered where a step uses it).',
      choices=sharding.PARAM_RULES)
  stream: bool = common.flag_field(
      False, 'Memory-bounded run: the dense blocks stay on disk (a Hugging Face directory\'s '
      'safetensors shards or a GGUF file) and are read one at a time, each finished block goes '
      'to host memory, and the evaluation runs block by block; devices hold about one block. '
      'Compression, --recover and --export/--save only (no --reconstruct, --finetune, '
      '--auto_bits or probes).')
  distributed: str = common.flag_field(
      'auto', 'Several processes (hosts) as one run through jax.distributed: auto (when '
      '--coordinator_address/--num_processes/--process_id or the environment ask for it: a SLURM '
      'step of several tasks, a multi-host TPU slice, JAX_COORDINATOR_ADDRESS)|on (always; JAX '
      'detects what is not given)|off (one process).', choices=distributed.MODES)
  coordinator_address: str | None = common.flag_field(
      None, 'HOST:PORT of process 0, where the processes meet (default: from the cluster '
      'environment).')
  num_processes: int | None = common.flag_field(
      None, 'Number of processes of the run (default: from the cluster environment).')
  process_id: int | None = common.flag_field(
      None, 'This process\'s number, 0 to --num_processes - 1; process 0 writes the results '
      '(default: from the cluster environment).')


def build_spec(c: CompressConfig) -> rules_lib.LinearSpec:
  """The uniform spec from the flags; raises ValueError listing every problem of the flags that
  needs no model or file (one line each, naming the flag) before any work. ``group_size=None``
  stands for 128 here: :func:`resolve` it against the model first (:func:`run` does)."""
  spec, problems = _spec_problems(c)
  if problems:
    raise ValueError('\n'.join(problems))
  return spec


def build_rules(c: CompressConfig, spec: rules_lib.LinearSpec) -> list[rules_lib.Rule]:
  extra = [rules_lib.parse_rule(r, spec) for r in c.rules]
  return extra + rules_lib.uniform(spec, include_head=c.include_head)


def recon_config(c: CompressConfig) -> reconstruct_lib.ReconConfig:
  """The reconstruction settings of the flags (raises ValueError naming a bad value)."""
  try:
    return reconstruct_lib.ReconConfig(
        window=c.reconstruct, epochs=c.recon_epochs, batch_size=c.recon_batch,
        optim=train_lib.OptimConfig(lr=c.recon_lr), loss=c.recon_loss, inputs=c.recon_inputs,
        quant_mode=c.recon_quant_mode, peft=c.recon_peft, seed=c.seed, train=c.recon_train,
        **({'lora_rank': c.rank, 'lora_alpha': float(c.rank)} if c.recon_train == 'adapters'
           else {}))
  except ValueError as e:
    raise ValueError(f'--reconstruct: {e}') from e


def adapters_trained(c: CompressConfig) -> bool:
  """Whether reconstruction trains low-rank adapters alone (``--recon_train=adapters``)."""
  return c.reconstruct != 'none' and c.recon_train == 'adapters'


def compensator(c: CompressConfig) -> compensate_lib.Compensator | None:
  """The training-free compensation of the flags (None without ``--recover``). Its adapters stay
  float when something changes them afterwards (a global rank budget cuts them, an adapters-only
  reconstruction trains them); ``--adapter_bits`` then applies at the end. A global budget
  computes ``--budget_max_rank`` before allotting."""
  if c.recover == 'none':
    return None
  later = c.rank_budget == 'global' or adapters_trained(c)
  rank = (c.budget_max_rank or 4 * c.rank) if c.rank_budget == 'global' else c.rank
  srr_budget = c.rank_budget == 'global' and c.recover == 'srr'
  return compensate_lib.Compensator(method=c.recover, rank=rank,
                                    adapter_bits=16 if later else c.adapter_bits, srr_k=c.srr_k,
                                    shrink=c.eora_shrink if c.recover == 'eora' else 0.0,
                                    budget_rank=c.rank if srr_budget else 0)


# --------------------------------------------------------------------------- validation before work

DEFAULT_GROUP_SIZE = 128
# The default --group_size: the first of these that divides the input width of every block linear.
GROUP_SIZE_CANDIDATES = (128, 64, 32)
# A token covers at least one byte of text, and a tokenizer adds at most a few of its own (BOS, EOS,
# a SentencePiece word start): a text of n bytes holds at most n + _EXTRA_TOKENS tokens.
_EXTRA_TOKENS = 4

# Flags that do nothing unless another flag selects what they tune: (flags, when they are ignored,
# why). A flag is only reported when it was given (see :func:`validate`).
_IGNORED_UNLESS = (
    (('sparsity',), lambda c: c.prune == 'none',
     'without --prune (magnitude|wanda|sparsegpt): nothing is pruned'),
    (('bits', 'group_size', 'sym'), lambda c: c.quant == 'none' and c.auto_bits is None,
     'without --quant (rtn|gptq|awq): nothing is quantized'),
    (('auto_candidates',), lambda c: c.auto_bits is None, 'without --auto_bits'),
    (('static_groups',), lambda c: c.quant != 'gptq', 'without --quant=gptq'),
    (('wandapp_alpha',), lambda c: c.prune != 'wanda++', 'without --prune=wanda++'),
    (('awq_clip',), lambda c: c.quant != 'awq', 'without --quant=awq'),
    (('include_head', 'true_sequential', 'dense_inputs', 'rules', 'moe_calibration',
      'moe_min_tokens', 'moe_starved'),
     lambda c: c.prune == 'none' and c.quant == 'none',
     'without --prune or --quant: nothing is compressed'),
    (('rank', 'adapter_bits'), lambda c: c.recover == 'none' and not adapters_trained(c),
     'without --recover (or --reconstruct with --recon_train=adapters)'),
    (('recover_data', 'eora_shrink', 'rank_budget', 'budget_max_rank'),
     lambda c: c.recover == 'none', 'without --recover'),
    (('budget_max_rank', 'budget_weighting'), lambda c: c.rank_budget != 'global',
     'without --rank_budget=global'),
    (('srr_k',), lambda c: c.recover != 'srr', 'without --recover=srr'),
    (('recover_samples',), lambda c: c.recover == 'none' or c.recover_data is None,
     'without --recover and --recover_data'),
    (('recon_samples', 'recon_epochs', 'recon_lr', 'recon_batch', 'recon_inputs', 'recon_loss',
      'recon_quant_mode', 'recon_peft', 'recon_train'), lambda c: c.reconstruct == 'none',
     'without --reconstruct'),
    (('ft_steps', 'ft_samples', 'ft_lr'), lambda c: c.finetune == 'none', 'without --finetune'),
    (('ft_distill',), lambda c: c.finetune in ('none', 'idp'),
     'without --finetune=lora|qat|global'),
    (('lora_rank', 'lora_init'), lambda c: c.finetune != 'lora', 'without --finetune=lora'),
    (('idp_prompts',), lambda c: c.finetune != 'idp', 'without --finetune=idp'),
)
_GRID_FLAGS = frozenset({'bits', 'group_size', 'sym'})


def _flag_text(name: str, value) -> str:
  """How ``--name`` with ``value`` reads on a command line."""
  if isinstance(value, bool):
    return f'--{name}' if value else f'--no{name}'
  if isinstance(value, (tuple, list)):
    return f'--{name}={",".join(map(str, value))}'
  return f'--{name}={value}'


def _linear_shapes(cfg) -> dict[str, tuple[int, int, str]]:
  """``[in, out]`` and the name of the input width of every block linear."""
  qd = cfg.num_heads * cfg.head_dim
  names = {'attn_in': 'hidden size', 'mlp_in': 'hidden size', 'down_in': 'intermediate size',
           'o_in': 'hidden size' if qd == cfg.hidden_size else 'num_heads x head_dim',
           'shared_down_in': 'shared expert size'}
  return {lin: (i, o, names.get(llama.input_key(lin), 'expert intermediate size'))
          for lin, (i, o) in llama.linear_shapes(cfg).items()}


def resolve(c: CompressConfig, model_config) -> CompressConfig:
  """``c`` with its model-dependent defaults filled in: ``group_size=None`` becomes 128, or the
  largest of 128/64/32 that divides the input width of every block linear of ``model_config``
  (64 on SmolLM2-135M: no linear then has a shorter last group); 128 when none does."""
  if c.group_size is not None:
    return c
  widths = {shape[0] for shape in _linear_shapes(model_config).values()}
  g = next((g for g in GROUP_SIZE_CANDIDATES if all(w % g == 0 for w in widths)),
           DEFAULT_GROUP_SIZE)
  return dataclasses.replace(c, group_size=g)


def _spec_problems(c: CompressConfig) -> tuple[rules_lib.LinearSpec | None, list[str]]:
  """``(uniform spec, problems)``: every problem of the flags that needs neither the model nor a
  file, one line each naming the flag. The spec is None when its own flags are bad."""
  p: list[str] = []
  compresses = c.prune != 'none' or c.quant != 'none' or c.compressed is not None
  spec_ok = True
  if c.prune not in rules_lib.PRUNE_METHODS:
    p.append(f'--prune={c.prune!r} is not a pruning method; choose one of '
             f'{rules_lib.PRUNE_METHODS}')
    spec_ok = False
  if c.quant not in rules_lib.QUANT_METHODS:
    p.append(f'--quant={c.quant!r} is not a quantization method; choose one of '
             f'{rules_lib.QUANT_METHODS}')
    spec_ok = False
  if c.recover not in compensate_lib.METHODS:
    p.append(f'--recover={c.recover!r} is not a recovery method; choose one of '
             f'{compensate_lib.METHODS}')
  sparsity = None
  if c.prune != 'none':
    try:
      sparsity = PruneSpec.parse(c.sparsity)
    except ValueError as e:
      p.append(f'--sparsity={c.sparsity}: {e}')
      spec_ok = False
  qspec = None
  if c.quant != 'none' or c.auto_bits is not None:
    group_size = DEFAULT_GROUP_SIZE if c.group_size is None else c.group_size
    if c.bits not in SUPPORTED_BITS:
      p.append(f'--bits={c.bits} is not supported; choose one of {SUPPORTED_BITS}')
      spec_ok = False
    if group_size != -1 and group_size <= 0:
      p.append(f'--group_size={group_size} must be positive, or -1 (one group per output unit)')
      spec_ok = False
    if spec_ok:
      qspec = QuantSpec(bits=c.bits, group_size=group_size, symmetric=c.sym)
  if c.act_order and c.quant != 'gptq':
    p.append(f'--act_order only applies to --quant=gptq (got --quant={c.quant})')
    spec_ok = False
  if c.asymmetric and c.quant != 'gptq' and c.prune != 'sparsegpt':
    p.append(f'--asymmetric (GPTAQ) only applies to --quant=gptq and --prune=sparsegpt (got '
             f'--quant={c.quant} --prune={c.prune})')
    spec_ok = False
  if c.asymmetric and c.dense_inputs:
    p.append('--asymmetric fits compressed inputs to dense outputs: with --dense_inputs both are '
             'dense and it changes nothing')
  if c.quant == 'awq' and c.prune != 'none':
    p.append(f'--quant=awq cannot be combined with --prune={c.prune}; use --quant=gptq or rtn')
    spec_ok = False
  if c.auto_bits is not None:
    if c.quant == 'none':
      p.append(f'--auto_bits={c.auto_bits:g} needs a quantization method (--quant=rtn|gptq|awq): '
               'without one nothing is quantized and the model runs dense')
    bad = [b for b in c.auto_candidates if b not in SUPPORTED_BITS]
    if not c.auto_candidates:
      p.append(f'--auto_candidates is empty; give bit widths out of {SUPPORTED_BITS}')
    elif bad:
      p.append(f'{_flag_text("auto_candidates", c.auto_candidates)}: '
               f'{",".join(map(str, bad))} ' + ('is not a supported bit width' if len(bad) == 1 else
                                                'are not supported bit widths') +
               f'; choose from {SUPPORTED_BITS}')
    elif not min(c.auto_candidates) <= c.auto_bits <= max(c.auto_candidates):
      p.append(f'--auto_bits={c.auto_bits:g} is outside the range of --auto_candidates '
               f'({min(c.auto_candidates)} to {max(c.auto_candidates)} bits)')
  for name, low in (('batch_size', 1), ('calib_samples', 1), ('calib_seqlen', 2),
                    ('eval_seqlen', 2)):
    value = getattr(c, name)
    if value < low:
      p.append(f'--{name}={value} must be ' + ('positive' if low == 1 else f'at least {low}'))
  if c.eval_windows != -1 and c.eval_windows < 1:
    p.append(f'--eval_windows={c.eval_windows} must be positive, or -1 for every window')
  if not c.eval_data:
    p.append('--eval_data is empty; name at least one corpus or text file')
  if c.seed < 0:
    p.append(f'--seed={c.seed} must be non-negative')
  if c.moe_min_tokens < 0:
    p.append(f'--moe_min_tokens={c.moe_min_tokens} must be non-negative')
  if c.export == 'peft' and c.recover == 'none' and c.finetune != 'lora':
    p.append('--export=peft writes low-rank adapters, but nothing makes them: add --recover '
             '(svd|eora|actsvd|srr) or --finetune=lora, or use --export=hf')
  if not c.checkpoint_every_s >= 0:
    p.append(f'--checkpoint_every_s={c.checkpoint_every_s} must be non-negative (0: save after '
             'every block, window or chunk)')
  if c.srr_k is not None and c.srr_k < -1:
    p.append(f'--srr_k={c.srr_k} must be -1 (search), 0 or a positive preserved rank '
             '(unset: the energy rule)')
  if c.recover != 'none':
    if not compresses:
      p.append('--recover needs a compression (--prune, --quant or --compressed)')
    n = len(p)
    if c.rank <= 0:
      p.append(f'--rank={c.rank} must be positive')
    if c.adapter_bits not in compensate_lib.ADAPTER_BITS:
      p.append(f'--adapter_bits={c.adapter_bits} is not supported; choose one of '
               f'{compensate_lib.ADAPTER_BITS}')
    if c.recover == 'srr' and c.srr_k is not None and c.srr_k > c.rank > 0:
      p.append(f'--srr_k={c.srr_k} exceeds --rank={c.rank}: the preserved directions are part of '
               'the adapter rank')
    if c.recover_data is not None and c.recover_samples <= 0:
      p.append(f'--recover_samples={c.recover_samples} must be positive')
    if c.eora_shrink and c.recover != 'eora':
      p.append(f'--eora_shrink={c.eora_shrink:g} applies to --recover=eora, not {c.recover}')
    if c.rank_budget == 'global' and c.recover not in ('eora', 'srr'):
      p.append(f'--rank_budget=global allots ranks by EoRA\'s gains: it needs --recover=eora or '
               f'srr, not {c.recover}')
    if c.rank_budget == 'global' and c.budget_max_rank and c.budget_max_rank < c.rank:
      p.append(f'--budget_max_rank={c.budget_max_rank} is below --rank={c.rank}: the budget '
               'could not even give every linear the uniform rank')
    if len(p) == n and c.recover in compensate_lib.METHODS:
      try:
        compensator(c)
      except ValueError as e:
        p.append(f'--recover={c.recover}: {e}')
  elif adapters_trained(c) and c.rank <= 0:
    p.append(f'--rank={c.rank} must be positive (the rank of the adapters --recon_train=adapters '
             'trains)')
  if c.reconstruct != 'none':
    try:
      recon_config(c)
    except ValueError as e:
      p.append(str(e))
    if c.recon_samples < c.recon_batch:
      p.append(f'--recon_samples={c.recon_samples} is smaller than the batch --recon_batch='
               f'{c.recon_batch}')
  if c.finetune not in FINETUNE_METHODS:
    p.append(f'--finetune={c.finetune!r} is not a fine-tuning method; choose one of '
             f'{FINETUNE_METHODS}')
  elif c.finetune != 'none':
    n = len(p)
    for name in ('ft_steps', 'ft_samples'):
      if getattr(c, name) <= 0:
        p.append(f'--{name}={getattr(c, name)} must be positive')
    if c.ft_lr is not None and not c.ft_lr > 0:
      p.append(f'--ft_lr={c.ft_lr} must be positive')
    if c.finetune == 'idp':
      if c.idp_prompts <= 0:
        p.append(f'--idp_prompts={c.idp_prompts} must be positive')
      elif c.idp_prompts > c.ft_samples > 0:
        p.append(f'--idp_prompts={c.idp_prompts} exceeds --ft_samples={c.ft_samples}: every prompt '
                 'needs its own training sequences')
    else:
      if c.lora_rank <= 0:
        p.append(f'--lora_rank={c.lora_rank} must be positive')
      if c.lora_init not in LORA_INITS:
        p.append(f'--lora_init={c.lora_init!r}; choose one of {LORA_INITS}')
      elif c.finetune == 'lora' and c.lora_init in ('eora', 'srr') and (
          c.recover != c.lora_init or c.rank != c.lora_rank):
        p.append(f'--lora_init={c.lora_init} starts from the {c.lora_init} adapters: pass '
                 f'--recover={c.lora_init} --rank={c.lora_rank}')
    if len(p) == n:  # the remaining checks of the training configs themselves
      try:
        if c.finetune == 'idp':
          prompting.IDPConfig(num_prompts=c.idp_prompts, steps=c.ft_steps, seed=c.seed,
                              **({'lr': c.ft_lr} if c.ft_lr else {}))
        else:
          from recover import finetune as finetune_lib  # pylint: disable=g-import-not-at-top
          finetune_lib.FinetuneConfig(c.finetune, c.ft_steps, lr=c.ft_lr, lora_rank=c.lora_rank,
                                      lora_init=c.lora_init, distill=c.ft_distill, seed=c.seed)
      except ValueError as e:
        p.append(f'--finetune={c.finetune}: {e}')
  if (c.reconstruct != 'none' or c.finetune != 'none') and not compresses:
    p.append('--reconstruct/--finetune need a compression (--prune, --quant or --compressed)')
  spec = None
  if spec_ok:
    try:
      spec = rules_lib.LinearSpec(prune=c.prune, sparsity=sparsity, quant=c.quant, qspec=qspec,
                                  act_order=c.act_order, static_groups=c.static_groups,
                                  awq_clip=c.awq_clip)
      if c.asymmetric:
        spec = dataclasses.replace(spec, asymmetric=True)
      if c.prune == 'wanda++':
        spec = dataclasses.replace(spec, wandapp_alpha=c.wandapp_alpha)
    except ValueError as e:
      p.append(str(e))
  return spec, p


def _ignored_problems(c: CompressConfig, given: Collection[str]) -> list[str]:
  """The flags of ``given`` that do nothing with the others (:data:`_IGNORED_UNLESS`)."""
  p = []
  for names, ignored, why in _IGNORED_UNLESS:
    if ignored(c):
      p += [f'{_flag_text(n, getattr(c, n))} has no effect {why}' for n in names if n in given]
  return p


def _where(paths: list[str], num_layers: int) -> str:
  """``layers/*/mlp/down_proj`` for a linear of every block, else the paths (a few, then a
  count)."""
  by_lin: dict[str, list[str]] = {}
  for path in paths:
    if path.startswith('layers/'):
      i, lin = path[len('layers/'):].split('/', 1)
      by_lin.setdefault(lin, []).append(i)
    else:
      by_lin.setdefault(path, [])
  names = [f'layers/*/{lin}' if len(ix) == num_layers else
           (f'layers/{ix[0]}/{lin}' if len(ix) == 1 else f'layers/{{{",".join(ix)}}}/{lin}')
           if ix else lin for lin, ix in by_lin.items()]
  return ', '.join(names) if len(names) <= 3 else (
      f'{", ".join(names[:2])} and {len(names) - 2} more linears')


def _model_problems(c: CompressConfig, cfg, spec: rules_lib.LinearSpec | None,
                    default_group: bool) -> list[str]:
  """Problems of the flags against the model's config: lengths against its positions, the rules,
  group sizes and N:M patterns against the widths of the linears they compress, adapter ranks."""
  p = []
  model = c.model
  for name in ('calib_seqlen', 'eval_seqlen'):
    if getattr(c, name) > cfg.max_position_embeddings:
      p.append(f'--{name}={getattr(c, name)} exceeds the {cfg.max_position_embeddings} positions '
               f'of {model} (max_position_embeddings)')
  if loading.is_saved_model(model):
    meta = checkpoint.load_metadata(model)['metadata']
    if meta.get('method', 'dense') != 'dense':
      p.append(f'--model={model} is a compressed checkpoint ({meta.get("method")}) written by '
               f'--save; compress its source model ({meta.get("model")}) instead')
  has_head = not cfg.tie_word_embeddings
  if c.include_head and not has_head:
    p.append(f'--include_head has no effect: {model} ties its LM head to the token embeddings')
  if spec is None:
    return p
  shapes = _linear_shapes(cfg)
  paths = {f'layers/{i}/{lin}': shapes[lin] for i in range(cfg.num_layers) for lin in shapes}
  if has_head:
    paths['lm_head'] = (cfg.hidden_size, cfg.vocab_size, 'hidden size')
  extra = []
  for text in c.rules:
    try:
      rule = rules_lib.parse_rule(text, spec)
    except ValueError as e:
      p.append(f'--rules={text}: {e}')
      continue
    extra.append(rule)
    if not any(re.fullmatch(rule.pattern, f'{path}/kernel') for path in paths):
      p.append(f'--rules={text}: the pattern matches no linear of {model} (paths look like '
               f'layers/0/self_attn/q_proj/kernel' + (', lm_head/kernel)' if has_head else ')'))
  recipe = extra + rules_lib.uniform(spec, include_head=c.include_head)
  compressed = {}
  for path, shape in paths.items():
    s = spec if c.auto_bits is not None and path != 'lm_head' else rules_lib.match(
        recipe, f'{path}/kernel')
    if s is not None and not s.is_noop:
      compressed[path] = (s, shape)
  p += _export_problems(c, cfg, compressed)
  if not compressed:
    if not spec.is_noop:
      p.append(f'{_flag_text("rules", c.rules)}: no linear of {model} is left to compress')
    return p
  bad_groups: dict[tuple[int, int, str], list[str]] = {}
  bad_nm: dict[tuple[str, int, str], list[str]] = {}
  for path, (s, (n_in, _, width)) in compressed.items():
    # A shorter last group is fine (GPTQ's reference allows it) except in SparseGPT's joint sweep.
    if s.quant != 'none' and s.prune == 'sparsegpt' and s.qspec.is_ragged(n_in):
      bad_groups.setdefault((s.qspec.group_size, n_in, width), []).append(path)
    if s.sparsity is not None and s.sparsity.is_nm and n_in % s.sparsity.m:
      bad_nm.setdefault((s.sparsity.pattern, n_in, width), []).append(path)
  widths = sorted({shape[0] for _, shape in compressed.values()})
  fits = [g for g in GROUP_SIZE_CANDIDATES if all(w % g == 0 for w in widths)]
  for (g, n_in, width), where in bad_groups.items():
    hint = (f'; --group_size={fits[0]} divides every width ({", ".join(map(str, widths))})'
            if fits else f'; pass --group_size=-1 or a divisor of {n_in}')
    if default_group:
      hint = f' (the default: none of {GROUP_SIZE_CANDIDATES} divides every width)' + hint
    p.append(f'--group_size={g} does not divide the input width {n_in} of '
             f'{_where(where, cfg.num_layers)} ({width}), which --prune=sparsegpt with '
             f'quantization needs{hint}')
  for (pattern, n_in, width), where in bad_nm.items():
    p.append(f'--sparsity={pattern} needs input widths that are multiples of '
             f'{pattern.split(":")[1]}: {n_in} of {_where(where, cfg.num_layers)} ({width})')
  smallest = min(min(shape[:2]) for _, shape in compressed.values())
  at = [path for path, (_, shape) in compressed.items() if min(shape[:2]) == smallest]
  n_in, n_out = compressed[at[0]][1][:2]
  for name, used in (('rank', c.recover != 'none'), ('lora_rank', c.finetune == 'lora')):
    if used and getattr(c, name) > smallest:
      p.append(f'--{name}={getattr(c, name)} exceeds min(in, out) = {smallest} of '
               f'{_where(at, cfg.num_layers)} ({n_in} x {n_out}), the smallest compressed linear: '
               f'its adapter would be clipped there; pass --{name}={smallest} or less')
  return p


def _compressed_problems(c: CompressConfig, cfg) -> list[str]:
  """``--compressed=DIR``: nothing else compresses, and DIR is a model of ``--model``'s shapes."""
  p = []
  again = [f for f, on in (('--prune', c.prune != 'none'), ('--quant', c.quant != 'none'),
                           ('--rules', bool(c.rules)), ('--auto_bits', c.auto_bits is not None),
                           ('--include_head', c.include_head)) if on]
  if again:
    p.append(f'--compressed={c.compressed} takes the compressed linears from that checkpoint: '
             f'{", ".join(again)} would compress again; leave {"it" if len(again) == 1 else "them"}'
             ' out')
  try:
    given = loading.load_config(c.compressed)
  except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
    return p + [f'--compressed={c.compressed}: {e}']
  if cfg is not None:
    ours = (cfg.num_layers, cfg.vocab_size, llama.linear_shapes(cfg))
    theirs = (given.num_layers, given.vocab_size, llama.linear_shapes(given))
    if ours != theirs:
      p.append(f'--compressed={c.compressed} is not a model of --model={c.model}\'s shapes '
               f'({given.num_layers} blocks, vocabulary {given.vocab_size}, linears '
               f'{theirs[2]} against {cfg.num_layers}, {cfg.vocab_size}, {ours[2]})')
  return p


def _export_problems(c: CompressConfig, cfg, compressed: dict[str, Any]) -> list[str]:
  """Whether the packed export format (``--export``, or ``--peft_base`` under ``--export=peft``)
  can hold the leaves the rules will make, judged on their abstract shapes before any work."""
  fmt = c.peft_base if c.export == 'peft' else c.export
  if fmt not in export_lib.QUANTIZED_FORMATS:
    return []
  flag = f'--peft_base={fmt}' if c.export == 'peft' else f'--export={fmt}'
  p = []
  if c.export != 'peft' and (c.recover != 'none' or c.finetune == 'lora'):
    p.append(f'{flag} cannot hold the low-rank adapters this run makes (they cannot be merged '
             f'into packed weights): use --export=peft --peft_base={fmt}, which writes the base '
             'and the adapters PEFT attaches to it')
  if c.auto_bits is not None:
    return p  # the bits of each linear are chosen during the run; the export checks them then
  shapes = llama.linear_shapes(cfg)
  linears = {}
  for i in range(cfg.num_layers):
    for hf, (sub, lin) in loading.HF_LINEARS.items():
      spec = compressed.get(f'layers/{i}/{sub}/{lin}', (None,))[0]
      linears[f'model.layers.{i}.{hf}'] = matrix_lib.abstract_leaf(spec, shapes[f'{sub}/{lin}'])
  try:
    # A fused module (Phi-3's qkv_proj, gate_up_proj) is written as one matrix of its parts.
    loading.quantized_format(fmt).check_linears(export_lib.fuse_linears(linears, cfg))
  except export_lib.ExportError as e:
    p.append(f'{flag}: {e}')
  return p


def _text_problem(flag: str, source: str, need_tokens: int, what: str, cache: dict[str, Any],
                  windows: tuple[int | None, str, int, str] | None = None) -> str | None:
  """Whether a source can give what its flag needs, judged without a tokenizer and without
  downloading anything: a known corpus name (a hub corpus needs ``datasets`` and a reachable hub);
  a text file (``.txt``, ``.jsonl``, ``.parquet``) that exists, reads as text and has enough bytes
  for ``need_tokens`` tokens (``what`` says what needs them); a ``.npy`` of token windows whose
  header shows ``windows = (rows, rows_flag, seqlen, seqlen_flag)``: 2-D integer ids, ``seqlen``
  tokens a window and at least ``rows`` windows (None: any). ``cache`` holds what was read,
  across the calls of one validation."""
  if source in data_lib.KNOWN_SOURCES:
    if source in data_lib.HUB_CORPORA:
      if importlib.util.find_spec('datasets') is None:
        return (f'{flag}={source} needs the `datasets` library (pip install datasets) and the '
                'Hugging Face hub; use python-docs, shakespeare or a local text file')
      key = '\0hub'  # no path holds a NUL
      if key not in cache:  # a TCP connection opened and closed, nothing downloaded
        cache[key] = data_lib.hub_unreachable(timeout_s=2.0)
      if cache[key] is not None:
        return (f'{flag}={source} needs the Hugging Face hub, and {cache[key]}: pass a local '
                '.txt/.jsonl/.parquet file or use python-docs / shakespeare (with '
                'HF_DATASETS_OFFLINE=1, `datasets` reads a copy it cached before)')
    return None
  path = pathlib.Path(source).expanduser()
  if not path.exists():
    if data_lib._looks_like_path(source):  # pylint: disable=protected-access
      return f'{flag}={source}: no such file'
    return (f'{flag}={source} is neither a known corpus ({", ".join(data_lib.KNOWN_SOURCES)}) nor '
            'an existing file (.txt, .jsonl, .parquet, or .npy of token windows)')
  if not path.is_file():
    return f'{flag}={source} is a directory, not a file'
  if data_lib.is_windows_file(source):  # the header alone; the ids are checked when loaded
    if windows is None:
      return f'{flag}={source} is a .npy of token windows; {flag} takes text'
    if str(path) not in cache:
      try:
        cache[str(path)] = (data_lib.windows_header(path), None)
      except (OSError, ValueError) as e:
        cache[str(path)] = (None, str(e))
    header, error = cache[str(path)]
    if error:
      return f'{flag}={source}: {error}'
    rows, rows_flag, seqlen, seqlen_flag = windows
    problem = data_lib.windows_problem(*header, seqlen, rows, seqlen_name=seqlen_flag,
                                       rows_name=rows_flag)
    return f'{flag}={source} {problem}' if problem else None
  suffix = path.suffix.lower()
  documents = suffix in ('.jsonl', '.parquet')
  if str(path) not in cache:  # (bytes of text, whether any is not whitespace, what is wrong)
    try:
      raw = b'' if suffix == '.parquet' else path.read_bytes()
      text = raw.decode('utf-8')
      if documents:  # judged by its documents' text, as it will be read
        text = data_lib.load_text(path, 'train')
        raw = text.encode('utf-8')
      cache[str(path)] = (len(raw), text.strip() != '', None)
    except UnicodeDecodeError as e:
      cache[str(path)] = (None, None, f' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at '
                                      f'offset {e.start}): pass a text file')
    except OSError as e:
      cache[str(path)] = (None, None, f' cannot be read ({e.strerror or e})')
    except (ValueError, data_lib.DataUnavailableError) as e:  # a malformed .jsonl / .parquet
      cache[str(path)] = (None, None, f': {e}')
  size, has_text, error = cache[str(path)]
  if error:
    return f'{flag}={source}{error}'
  if size == 0:
    return f'{flag}={source} is empty'
  if not has_text:
    return f'{flag}={source} holds only whitespace'
  if size + _EXTRA_TOKENS < need_tokens:
    return (f'{flag}={source} is too short: {size} bytes' +
            (' of text' if documents else '') +
            f', and {what} needs {need_tokens} tokens (a token covers at least one byte)')
  return None


def _data_problems(c: CompressConfig) -> list[str]:
  """The calibration, evaluation and recovery sources and the probes file, without tokenizing:
  a text must be long enough, a ``.npy`` of windows must have the shape its use needs."""
  cache: dict[str, Any] = {}
  calib_need = c.calib_seqlen + 1
  calib_what = f'one calibration sequence (--calib_seqlen + 1 = {calib_need})'
  # The calibration windows a .npy must hold: the most that any stage takes from its first rows.
  calib_rows = [(c.calib_samples, '--calib_samples')]
  if c.reconstruct != 'none':
    calib_rows.append((c.recon_samples, '--recon_samples'))
  if c.finetune != 'none':
    calib_rows.append((c.ft_samples, '--ft_samples'))
  rows, rows_flag = max(calib_rows, key=lambda r: r[0])
  checks = [('--calib_data', c.calib_data, calib_need, calib_what,
             (rows, rows_flag, c.calib_seqlen, '--calib_seqlen'))]
  windows = max(c.eval_windows, 1)
  for source in c.eval_data:
    checks.append(('--eval_data', source, windows * c.eval_seqlen,
                   f'--eval_windows x --eval_seqlen = {windows} x {c.eval_seqlen}',
                   (None if c.eval_windows == -1 else c.eval_windows, '--eval_windows',
                    c.eval_seqlen, '--eval_seqlen')))
  if c.recover_data is not None and c.recover != 'none':
    checks.append(('--recover_data', c.recover_data, calib_need, calib_what,
                   (c.recover_samples, '--recover_samples', c.calib_seqlen, '--calib_seqlen')))
  p = [msg for flag, source, need, what, win in checks
       if (msg := _text_problem(flag, source, need, what, cache, win)) is not None]
  if c.probes not in (None, 'none'):
    try:
      data_lib.load_mc_jsonl(c.probes)
    except (OSError, ValueError) as e:
      p.append(f'--probes={c.probes}: {e}' if not isinstance(e, UnicodeDecodeError) else
               f'--probes={c.probes} is not UTF-8 text')
  return p


def _not_writable(directory: pathlib.Path) -> str | None:
  """Why files cannot be made in ``directory`` (created when missing), found by creating and
  removing one in it, or in its nearest existing ancestor when it does not exist yet (nothing is
  left behind, no directory is created); None when they can."""
  probe = directory
  while not probe.exists() and probe.parent != probe:
    probe = probe.parent
  if not probe.is_dir():
    return f'{probe} is not a directory'
  try:
    fd, tmp = tempfile.mkstemp(prefix='.write-check-', dir=probe)
  except OSError as e:
    return f'cannot create files in {probe} ({e.strerror or e})'
  os.close(fd)
  os.unlink(tmp)
  return None


def _output_problems(out_dir: str | None, save: str | None) -> list[str]:
  """``out_dir`` and ``save``'s directory must be writable; ``save`` (which a save replaces) must
  not be a file, another directory's content, or hold ``out_dir``."""
  p = []
  out = pathlib.Path(out_dir).expanduser().absolute() if out_dir else None
  if out is not None:
    if out.exists() and not out.is_dir():
      p.append(f'--out_dir={out_dir} exists and is not a directory')
    elif (why := _not_writable(out)) is not None:
      p.append(f'--out_dir={out_dir} is not writable: {why}')
  if save:
    target = pathlib.Path(save).expanduser().absolute()
    if target.exists() and not target.is_dir():
      p.append(f'--save={save} exists and is not a directory')
    elif target.is_dir() and any(target.iterdir()) and not loading.is_saved_model(target):
      p.append(f'--save={save} is a directory that is not a saved model: saving replaces it; '
               'choose a new path')
    elif (why := _not_writable(target.parent)) is not None:
      p.append(f'--save={save} is not writable: {why}')
    if out is not None and (target == out or target in out.parents):
      p.append(f'--save={save} holds --out_dir={out_dir}: saving replaces that directory; choose '
               'a path outside it')
  return p


def _mesh_problems(c: CompressConfig, n_devices: int | None) -> list[str]:
  """``--mesh`` against the devices (``n_devices``, default this machine's) and the batch."""
  try:
    sizes = sharding.parse_mesh(c.mesh, n_devices)
  except ValueError as e:
    return [str(e)]
  if c.batch_size % sizes['data']:
    return [f'--batch_size={c.batch_size} is not a multiple of the data axis ({sizes["data"]} '
            'devices): its batches would run whole on every device; pass a multiple']
  return []


def distributed_settings(c: CompressConfig) -> distributed.Settings:
  """The ``jax.distributed`` settings of the flags."""
  return distributed.Settings(c.distributed, c.coordinator_address, c.num_processes, c.process_id)


def _distributed_problems(c: CompressConfig, n_devices: int | None) -> list[str]:
  """The distributed flags, and the mesh and batch of a run of several processes: the mesh spans
  every device, a model group stays inside one process and every batch splits over the
  processes."""
  s = distributed_settings(c)
  p = distributed.settings_problems(s)
  if p:
    return p
  if (s.mode == 'on' or (s.explicit and s.num_processes != 1)) and not distributed.is_initialized():
    return ['--distributed/--coordinator_address/--num_processes/--process_id ask for several '
            'processes, but jax.distributed was not started in this one (experiments.compress '
            'starts it; a library caller calls models.distributed.initialize first)']
  if n_devices is not None or not distributed.is_initialized():
    return []
  import jax  # pylint: disable=g-import-not-at-top
  count = jax.process_count()
  if count == 1:
    return []
  if s.num_processes is not None and s.num_processes != count:
    p.append(f'--num_processes={s.num_processes}, but {count} processes joined')
  try:
    sizes = sharding.parse_mesh(c.mesh)
  except ValueError:
    return p  # _mesh_problems names it
  n, local = jax.device_count(), jax.local_device_count()
  if sizes['data'] * sizes['model'] != n:
    p.append(f'--mesh={c.mesh} uses {sizes["data"] * sizes["model"]} of the {n} devices of '
             f'{count} processes: with several processes the mesh spans every device')
  if local % sizes['model']:
    p.append(f'--mesh={c.mesh}: the model axis ({sizes["model"]}) must divide the devices of each '
             f'process ({local}), so that a model group stays inside one process')
  if c.batch_size % count:
    p.append(f'--batch_size={c.batch_size} is not a multiple of the number of processes '
             f'({count}): every batch is split over them; pass a multiple')
  return p


def _stream_problems(c: CompressConfig) -> list[str]:
  """What ``--stream`` (one block on the devices at a time) cannot run: stages that hold the
  whole model."""
  if not c.stream:
    return []
  p = []
  for flag, value, off in (('reconstruct', c.reconstruct, 'none'), ('finetune', c.finetune, 'none'),
                           ('auto_bits', c.auto_bits, None)):
    if value != off:
      p.append(f'--{flag}={value} trains or searches on the whole model; --stream holds one block '
               f'at a time: drop one of them')
  if c.probes not in (None, 'none'):
    p.append(f'--probes={c.probes}: multiple-choice probes need the whole model; --stream '
             'evaluates perplexity block by block (pass --probes=none)')
  return p


def validate(c: CompressConfig, *, out_dir: str | None = None, save: str | None = None,
             given: Collection[str] | None = None, model_config=None,
             n_devices: int | None = None) -> list[str]:
  """Every problem of a run of ``c`` that shows before any work, one line each naming the flag
  (empty: none). Reads the model's config (not its weights: :func:`models.loading.load_config`,
  or ``model_config``), checks the text files (exist, UTF-8, long enough for what they must give)
  and the probes, and that ``out_dir`` and ``save``'s directory are writable (by creating and
  removing a file there; nothing is left behind). Checked: the methods and their settings, the
  rules (syntax, bits, a pattern matching nothing), group sizes and N:M patterns against the input
  widths of the linears they compress, adapter ranks (``--rank``, ``--lora_rank``) against the
  smallest compressed linear, sequence lengths against the model's positions, sizes and counts,
  the seed, and flags that do nothing with the others (``--sparsity`` without ``--prune``,
  ``--auto_bits`` without ``--quant``, ...). Whether a corpus holds ``--eval_windows`` windows is
  only known after tokenizing (a file too short for them at one byte per token is reported).

  ``given``: the flags set on the command line (``experiments.compress`` passes them); a flag of
  ``given`` that has no effect is an error. None (library callers): the fields that differ from
  their defaults, except a quantization grid (``bits``, ``group_size``, ``sym``) beside a pruning
  method (sweeps share one grid across their rows).
  """
  problems: list[str] = []
  cfg = model_config
  if cfg is None:
    try:
      cfg = loading.load_config(c.model)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
      problems.append(f'--model={c.model}: {e}')
  resolved = resolve(c, cfg) if cfg is not None else c
  spec, spec_problems = _spec_problems(resolved)
  problems += spec_problems + _mesh_problems(c, n_devices) + _distributed_problems(c, n_devices)
  if given is None:
    defaults = CompressConfig()
    given = {f.name for f in dataclasses.fields(c)
             if getattr(c, f.name) != getattr(defaults, f.name)}
    if c.prune != 'none':
      given -= _GRID_FLAGS
  problems += _ignored_problems(c, given)
  if cfg is not None:
    problems += _model_problems(resolved, cfg, spec, default_group=c.group_size is None)
  if c.compressed is not None:
    problems += _compressed_problems(c, cfg)
  problems += _stream_problems(c)
  problems += _data_problems(resolved)
  problems += _output_problems(out_dir, save)
  if c.export != 'none' and not out_dir:
    problems.append(f'--export={c.export} writes to OUT_DIR/export_{c.export}: pass --out_dir')
  return problems
