"""The same work on several meshes of simulated CPU devices; run by tests/test_mesh.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.mesh_check OUT.json

For every compression method (and the recoveries EoRA and SRR, also with activations in host
memory) on the tiny model and on a tiny mixture of 8 experts (the experts of a block solved as
one stack split over the devices), on meshes data:1 (one device), data:8 and data:4,model:2; for
the main command with block reconstruction, LoRA fine-tuning and evaluation; and for training
with the parameters fully sharded (``fsdp``) against replicated, it writes, per case and mesh,
how far the result is from the one-device run: whether every integer leaf (codes, zeros, masks,
2:4 indices) is identical, the largest relative difference of the float leaves (adapters
compared as their product ``a @ b``: their factors are defined up to signs) and of the
perplexities.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from compress import pipeline
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import compress_lib
from experiments import config as run_config
from kernels import QuantSpec, formats
from models import checkpoint
from models import config as config_lib
from models import evaluate
from models import llama
from models import losses
from models import sharding
from recover import compensate
from recover import finetune
from recover import reconstruct
from recover import train

MESHES = ('data:1', 'data:8', 'data:4,model:2')
Q4 = QuantSpec(bits=4, group_size=32)


def _placement(mesh: str) -> sharding.Placement:
  name, _, offload = mesh.partition(' ')
  return sharding.Placement.create(name, offload or 'none')


def _comparable(tree):
  """Integer leaves and float leaves, adapters as their product (their factors are determined only
  up to rotations of equal singular values)."""
  def one(leaf):
    if isinstance(leaf, formats.CompressedLinear) and leaf.adapter is not None:
      a, b = (formats.dequantize(x) if isinstance(x, formats.QuantizedWeight) else x
              for x in (leaf.adapter.a, leaf.adapter.b))
      return formats.CompressedLinear(weight=leaf.weight, mask=leaf.mask,
                                      adapter=formats.LowRank(a=a @ b, b=jnp.zeros((0,))))
    return leaf
  leaves = jax.tree.leaves(jax.tree.map(one, tree, is_leaf=formats.is_weight_leaf))
  return [np.asarray(x) for x in leaves]


def _distance(a, b) -> dict:
  ints, rel = True, 0.0
  for x, y in zip(_comparable(a), _comparable(b), strict=True):
    if x.dtype.kind in 'iub':
      ints &= bool(np.array_equal(x, y))
    elif x.size:
      rel = max(rel, float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30)))
  return {'ints_equal': ints, 'float_rel': rel}


def methods() -> dict:
  cfg = config_lib.tiny_config(num_layers=2)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (16, 32), 0, cfg.vocab_size))
  cases = {
      'rtn': (rules_lib.LinearSpec(quant='rtn', qspec=Q4), None),
      'gptq act-order': (rules_lib.LinearSpec(quant='gptq', qspec=Q4, act_order=True), None),
      'wanda 2:4': (rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('2:4')), None),
      'sparsegpt 50%': (rules_lib.LinearSpec(prune='sparsegpt', sparsity=PruneSpec.parse('0.5')),
                        None),
      'awq': (rules_lib.LinearSpec(quant='awq', qspec=Q4), None),
      'gptq + eora': (rules_lib.LinearSpec(quant='gptq', qspec=Q4),
                      compensate.Compensator(method='eora', rank=8)),
      'gptq + srr': (rules_lib.LinearSpec(quant='gptq', qspec=Q4),
                     compensate.Compensator(method='srr', rank=8)),
  }
  # A mixture of 8 experts: the same linear of all experts is solved as one stack, split along
  # the expert axis over the 8 devices.
  moe_cfg = config_lib.tiny_config(num_layers=2, num_experts=8, num_experts_per_tok=2,
                                   expert_intermediate_size=32)
  moe_params = llama.init_params(moe_cfg, jax.random.key(0), scale=0.1)
  models = {name: (cfg, params) for name in cases}
  cases['mixture gptq'] = (rules_lib.LinearSpec(quant='gptq', qspec=Q4), None)
  cases['mixture sparsegpt 2:4'] = (
      rules_lib.LinearSpec(prune='sparsegpt', sparsity=PruneSpec.parse('2:4')), None)
  models.update({'mixture gptq': (moe_cfg, moe_params),
                 'mixture sparsegpt 2:4': (moe_cfg, moe_params)})
  out = {}
  for name, (spec, recovery) in cases.items():
    runs = {}
    cfg, params = models[name]
    for mesh in MESHES + (('data:8 host',) if recovery is not None else ()):
      with sharding.use(_placement(mesh)):
        model, reports = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec),
                                                 progress=False, recovery=recovery, batch_size=8)
        if name.startswith('mixture'):
          assert all(r.extra['experts_solved_together'] == 8 for r in reports
                     if '/experts/' in r.name), name
        ppl = evaluate.perplexity(model, cfg, calib[:8], batch_size=8, progress=False)['ppl']
      runs[mesh] = (jax.tree.map(np.asarray, model), ppl)
    ref, ref_ppl = runs[MESHES[0]]
    out[name] = {mesh: dict(_distance(ref, model), ppl_rel=abs(ppl - ref_ppl) / ref_ppl)
                 for mesh, (model, ppl) in runs.items() if mesh != MESHES[0]}
  return out


def main_command(tmp: str) -> dict:
  """The main command: GPTQ + EoRA, block reconstruction, LoRA fine-tuning and evaluation, on one
  device and on data:4,model:2 with activations in host memory; the model is saved on the mesh
  and loaded back on one device."""
  corpus = f'{tmp}/corpus.txt'
  words = ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'compress', 'recover', 'layer']
  with open(corpus, 'w') as f:
    f.write(' '.join(np.random.default_rng(0).choice(words, size=6000)) + '\n')
  base = dict(model='tiny-llama', calib_data=corpus, calib_samples=8, calib_seqlen=32,
              eval_data=(corpus,), eval_seqlen=32, eval_windows=8, probes='none', batch_size=8,
              quant='gptq', bits=4, group_size=32, recover='eora', rank=8)
  extra = dict(reconstruct='block', recon_samples=8, recon_batch=8, finetune='lora', ft_steps=2,
               ft_samples=8, lora_rank=4)
  runs = {}
  for mesh in ('data:1', 'data:4,model:2 host'):
    name, _, offload = mesh.partition(' ')
    c = run_config.CompressConfig(**base, **extra, mesh=name, offload=offload or 'none')
    save = f'{tmp}/saved_{len(runs)}'
    res = compress_lib.run(c, out_dir=f'{tmp}/run_{len(runs)}', save=save)
    runs[mesh] = (checkpoint.load_model(save)[1], res)
  (ref, ref_res), (model, res) = runs.values()
  return {'reconstruct + lora': {'data:4,model:2 host': dict(
      _distance(ref, model), mesh_recorded=res['mesh'], offload_recorded=res['offload'],
      ppl_rel=max(abs(res[k] - ref_res[k]) / ref_res[k]
                  for k in ('ppl_compressed', 'ppl_recovered')))}}


def fsdp() -> dict:
  """Training with the parameters and Adam moments split along the data axis (``fsdp``) against
  replicated (both data:8) and one device: global fine-tuning, LoRA and a block reconstruction
  window of a GPTQ model; and the compiled loop's per-device memory of a dense global step."""
  cfg = config_lib.tiny_config(num_layers=2)
  dense = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (16, 32), 0, cfg.vocab_size))
  model, _ = pipeline.compress_model(dense, cfg, tokens, rules_lib.uniform(
      rules_lib.LinearSpec(quant='gptq', qspec=Q4)), progress=False, batch_size=8)
  out: dict = {}
  placements = {'data:1': sharding.Placement.create('data:1'),
                'data:8': sharding.Placement.create('data:8'),
                'data:8 fsdp': sharding.Placement.create('data:8', params='fsdp')}
  for method in ('global', 'lora'):
    runs = {}
    for name, placement in placements.items():
      with sharding.use(placement):
        trained, info = finetune.finetune(model, cfg, tokens, finetune.FinetuneConfig(
            method, steps=4, batch_size=8, lr=1e-3, lora_rank=8), progress=False)
      runs[name] = (jax.tree.map(np.asarray, trained), info['losses'], info['device_share'])
    ref, ref_losses, _ = runs['data:1']
    out[f'finetune {method}'] = {name: dict(
        _distance(ref, m), loss_rel=max(abs(a - b) / b for a, b in zip(l, ref_losses)),
        shard_fraction=f) for name, (m, l, f) in runs.items() if name != 'data:1'}
  runs = {}
  for name, placement in placements.items():
    with sharding.use(placement):
      recon, reports = reconstruct.reconstruct(model, dense, cfg, tokens, reconstruct.ReconConfig(
          window='block', batch_size=8, optim=train.OptimConfig(lr=1e-3)), progress=False)
    runs[name] = (jax.tree.map(np.asarray, recon), [r.loss_after for r in reports])
  ref, ref_losses = runs['data:1']
  out['reconstruct block'] = {name: dict(
      _distance(ref, m), loss_rel=max(abs(a - b) / b for a, b in zip(l, ref_losses)))
      for name, (m, l) in runs.items() if name != 'data:1'}
  # Per-device memory of the compiled loop (arguments: weights and Adam moments; 2 steps).
  def loss_fn(trainable, frozen, batch):
    del frozen
    return losses.lm_loss(llama.forward(trainable, batch, cfg), batch)
  opt = train.optimizer(train.OptimConfig(lr=1e-3), 2)
  memory = {}
  for name in ('data:8', 'data:8 fsdp'):
    with sharding.use(placements[name]):
      run = jax.jit(train.train_steps(loss_fn, opt))
      carry = sharding.shard_params((dense, opt.init(dense)))
      m = run.lower(carry, None, jnp.asarray(tokens[:8]), jnp.zeros((2, 8), jnp.int32)
                    ).compile().memory_analysis()
      memory[name] = {'argument_bytes': int(m.argument_size_in_bytes),
                      'shard_fraction': sharding.device_share(carry)}
  out['memory'] = memory
  return out


def main(path: str, tmp: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  result = {'methods': methods(), 'main_command': main_command(tmp), 'fsdp': fsdp()}
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
