"""``--export=peft`` with adapters on a mixture's experts (Mixtral, Qwen2-MoE, Qwen3-MoE).

transformers holds the experts as fused 3-D parameters (``mlp.experts.gate_up_proj [E, 2 ff,
hidden]``, ``down_proj [E, hidden, ff]``) and the router as ``mlp.gate.weight``; the export
writes their LoRA as PEFT ``target_parameters`` (PEFT's ``ParamWrapper``, one rank per stacked
parameter, experts padded with zeros), next to the attention and shared-expert LoRA of
``target_modules``. PEFT loads it on the ``hf`` base and computes our logits.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import formats
from models import export
from models import llama
from models import loading
from models import tree
from experiments import tiny_families as families

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

TOL = 1e-4

# (layer, our linear, rank): expert 0 has all three with different ranks, expert 1 gate and down,
# expert 2 none, expert 3 up only; layer 1 adapts one stacked parameter and the router.
ADAPTERS = [
    (0, 'self_attn/q_proj', 3),
    (0, 'mlp/experts/0/gate_proj', 2), (0, 'mlp/experts/0/up_proj', 3),
    (0, 'mlp/experts/0/down_proj', 1),
    (0, 'mlp/experts/1/gate_proj', 4), (0, 'mlp/experts/1/down_proj', 2),
    (0, 'mlp/experts/3/up_proj', 1),
    (1, 'mlp/gate', 2),
]
LAYER1 = {'mixtral': [(1, 'mlp/experts/2/down_proj', 3)],
          'qwen2_moe': [(1, 'mlp/experts/1/up_proj', 2), (1, 'mlp/shared_expert/gate_proj', 2),
                        (1, 'mlp/shared_expert/down_proj', 3),
                        (1, 'mlp/shared_expert_gate', 1)],
          'qwen3_moe': [(1, 'mlp/experts/3/gate_proj', 2)]}


def _adapted(params, adapters, seed=0):
  """``params`` with a random float ``LowRank`` of the given rank on each ``(layer, linear)``."""
  rng = np.random.default_rng(seed)
  layers = list(params['layers'])
  for i, lin, r in adapters:
    w = tree.get_linear(layers[i], lin)
    n_in, n_out = w.shape
    a = rng.normal(size=(n_in, r)) / np.sqrt(n_in)
    b = rng.normal(size=(r, n_out)) * 0.5
    layers[i] = tree.set_linear(layers[i], lin, formats.CompressedLinear(
        weight=jnp.asarray(w), adapter=formats.LowRank(a=jnp.asarray(a, jnp.float32),
                                                       b=jnp.asarray(b, jnp.float32))))
  return dict(params, layers=layers)


def _move_adapter(params, layer, src, dst):
  """``params`` with the adapters of expert ``src``'s linears of ``layer`` moved to ``dst``'s."""
  layers = list(params['layers'])
  block = layers[layer]
  for m in ('gate_proj', 'up_proj', 'down_proj'):
    leaf = tree.get_linear(block, f'mlp/experts/{src}/{m}')
    if isinstance(leaf, formats.CompressedLinear) and leaf.adapter is not None:
      block = tree.set_linear(block, f'mlp/experts/{src}/{m}', leaf.weight)
      block = tree.set_linear(block, f'mlp/experts/{dst}/{m}', formats.CompressedLinear(
          weight=formats.to_dense(tree.get_linear(block, f'mlp/experts/{dst}/{m}')),
          adapter=leaf.adapter))
  layers[layer] = block
  return dict(params, layers=layers)


@pytest.mark.parametrize('name', families.MOE_FAMILIES)
def test_peft_loads_expert_adapters_on_the_hf_base(tmp_path, name):
  cfg, params = loading.load_hf_dir(families.save(name, tmp_path / 'hf'))
  params = _adapted(params, ADAPTERS + LAYER1[name])
  path = export.save(tmp_path / 'peft', 'peft', params, cfg, peft_base='hf')

  config = json.loads((path / 'adapter' / 'adapter_config.json').read_text())
  layer1 = {'mixtral': 'down_proj', 'qwen2_moe': 'gate_up_proj', 'qwen3_moe': 'gate_up_proj'}[name]
  assert config['target_parameters'] == sorted([
      'model.layers.0.mlp.experts.gate_up_proj', 'model.layers.0.mlp.experts.down_proj',
      f'model.layers.1.mlp.experts.{layer1}', 'model.layers.1.mlp.gate.weight'])
  rank = lambda t: config['rank_pattern'].get(t, config['r'])  # noqa: E731
  # gate_up: the largest per-expert sum of gate and up ranks (expert 0: 2 + 3, expert 1: 4).
  assert rank('model.layers.0.mlp.experts.gate_up_proj') == 5
  assert rank('model.layers.0.mlp.experts.down_proj') == 2
  assert all(config['alpha_pattern'].get(t, config['lora_alpha']) == rank(t)
             for t in config['target_parameters'])
  want_modules = {'q_proj'} | ({'gate_proj', 'down_proj', 'shared_expert_gate'}
                               if name == 'qwen2_moe' else set())
  assert set(config['target_modules']) == want_modules

  base = transformers.AutoModelForCausalLM.from_pretrained(path / 'base',
                                                           attn_implementation='eager')
  model = peft.PeftModel.from_pretrained(base.float(), path / 'adapter').eval()
  # Every tensor written is the one PEFT holds; what PEFT adds (modules that target_modules and
  # layers_to_transform name in a layer where they have no adapter) has a zero B.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  written = load_file(str(path / 'adapter' / 'adapter_model.safetensors'))
  held = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
  assert set(written) <= set(held)
  for k, v in written.items():
    np.testing.assert_array_equal(held[k], v, err_msg=k)
  assert not any('experts' in k or '.mlp.gate.' in k for k in set(held) - set(written))
  assert all(not held[k].any() for k in set(held) - set(written) if 'lora_B' in k)

  tokens = np.random.default_rng(1).integers(1, cfg.vocab_size, size=(2, 24))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
    with model.disable_adapter():
      plain = model(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(llama.forward(params, jnp.asarray(tokens), cfg))
  # The comparison tells experts apart: expert 1's adapters on expert 2 give other logits.
  moved = np.asarray(llama.forward(_move_adapter(params, 0, 1, 2), jnp.asarray(tokens), cfg))
  diff, without, misplaced = (np.abs(x - ref).max() for x in (ours, plain, moved))
  print(f'{name}: max |logit difference| to PEFT {diff:.2e}; without the adapters {without:.2e}; '
        f'expert 1\'s adapters on expert 2 {misplaced:.2e}')
  assert diff < TOL
  assert without > 100 * TOL and misplaced > 100 * TOL


def test_expert_adapters_with_a_packed_base_are_refused(tmp_path):
  """A gptq or compressed-tensors base holds the experts as packed per-expert linears, not the
  fused parameters the expert LoRA attaches to (transformers 5 does not load them into those):
  refused by name before anything is written."""
  cfg, params = loading.load_hf_dir(families.save('qwen3_moe', tmp_path / 'hf'))
  params = _adapted(params, [(0, 'mlp/experts/1/down_proj', 2)])
  for base in export.QUANTIZED_FORMATS:
    with pytest.raises(export.ExportError, match=r'model\.layers\.0\.mlp\.experts\.down_proj'):
      export.save(tmp_path / base, 'peft', params, cfg, peft_base=base)
    assert not (tmp_path / base).exists()
