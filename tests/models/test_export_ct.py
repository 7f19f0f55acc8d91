"""The compressed-tensors export, proven by loading it with compressed-tensors itself (through
transformers) and matching our logits; checkpoints the library writes load into our leaves.

The dequantized weights match bit for bit (scales are stored in float32, the model's dtype, and
both sides compute ``(code - zero) * scale`` in float32), so the logits differ only by the order
of float32 sums in torch and XLA (about 2e-6 on logits of this tiny model; ``LOGIT_ATOL`` leaves a
tenfold margin). Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` (a tiny random Phi-3 of
transformers' own ``Phi3Config``) are written as one packed matrix each, load in the library with
our weights and logits, and split back into our q/k/v and gate/up leaves.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from compress import calibration
from compress import matrix
from compress import quantize
from compress import rules as rules_lib
from compress.prune import PruneSpec
from experiments import tiny_families as families
from kernels import QuantSpec
from kernels import formats
from models import config as config_lib
from models import ct_format
from models import export
from models import llama
from models import loading
from models import tree

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
ct = pytest.importorskip('compressed_tensors', minversion='0.18')
safetensors_torch = pytest.importorskip('safetensors.torch')
pytestmark = pytest.mark.filterwarnings(
    'ignore:You passed `quantization_config`:UserWarning')  # transformers: we pass dequantize

LOGIT_ATOL = 2e-5
L = rules_lib.LinearSpec
ATTN, MLP = r'layers/\d+/self_attn/.*', r'layers/\d+/mlp/.*'
G32 = QuantSpec(bits=4, group_size=32)
G32_SYM = QuantSpec(bits=4, group_size=32, symmetric=True)
SPARSE24 = PruneSpec(n=2, m=4)
UNSTRUCTURED = PruneSpec(sparsity=0.5)

# Each case: (rule regex over 'layers/I/SUB/NAME/kernel', spec) pairs, first match wins.
CASES = {
    'gptq_w4_asym_g32': [('.*', L(quant='gptq', qspec=G32))],
    'rtn_w4_sym_g32': [('.*', L(quant='rtn', qspec=G32_SYM))],
    'gptq_w4_sym_actorder_static': [
        (MLP, L(quant='gptq', qspec=G32_SYM, act_order=True, static_groups=True)),
        (ATTN, L(quant='rtn', qspec=G32_SYM))],
    'rtn_w8_asym_channel': [('.*', L(quant='rtn', qspec=QuantSpec(bits=8, group_size=-1)))],
    'sparsegpt_24': [(MLP, L(prune='sparsegpt', sparsity=SPARSE24)),
                     (ATTN, L(prune='wanda', sparsity=SPARSE24))],
    'sparsegpt_24_gptq_w4': [
        (MLP, L(prune='sparsegpt', sparsity=SPARSE24, quant='gptq', qspec=G32)),
        (ATTN, L(prune='wanda', sparsity=SPARSE24, quant='rtn', qspec=G32))],
    'mixed': [  # several config groups, unstructured masks, a dense linear
        (r'layers/0/self_attn/.*', L(quant='rtn', qspec=G32)),
        (r'layers/0/mlp/.*', L(quant='rtn', qspec=QuantSpec(bits=8, group_size=-1,
                                                             symmetric=True))),
        (r'layers/1/self_attn/[qk]_proj/.*', L(prune='wanda', sparsity=UNSTRUCTURED)),
        (r'layers/1/self_attn/.*', L(prune='wanda', sparsity=UNSTRUCTURED, quant='rtn',
                                     qspec=QuantSpec(bits=2, group_size=32))),
        (r'layers/1/mlp/(gate|up)_proj/.*', L(quant='rtn', qspec=G32)),
        (r'layers/1/mlp/down_proj/.*', None)],
}


@pytest.fixture(scope='module')
def base():
  """A tiny model, token windows and one Hessian of random inputs per input width."""
  cfg = config_lib.tiny_config(num_layers=2, tie_word_embeddings=False)
  return _with_windows_and_stats(cfg, llama.init_params(cfg, jax.random.key(0), scale=0.1), 10)


def _with_windows_and_stats(cfg, params, seed: int):
  """``(cfg, params, token windows, {input width: LinearStats of random inputs})``."""
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size))
  stats = {}
  for k, width in enumerate((cfg.hidden_size, cfg.intermediate_size)):
    x = jax.random.normal(jax.random.key(seed + k), (256, width))
    stats[width] = calibration.LinearStats(hessian=x.T @ x, num_tokens=jnp.int32(256),
                                           act_abs_sum=jnp.abs(x).sum(0))
  return cfg, params, tokens, stats


def _compress(base, rules):
  """The model with each block linear a rule selects compressed by ``compress_matrix`` (the
  pipeline's per-matrix step; Hessians of random inputs stand in for its calibration passes)."""
  _, params, _, stats = base
  leaves = {}
  for path, w in tree.linear_leaves(params).items():
    spec = next((s for pattern, s in rules if re.fullmatch(pattern, path)), None)
    if spec is not None:
      leaves[path] = matrix.compress_matrix(w, stats[w.shape[0]], spec, path)[0]
  return tree.replace_leaves(params, leaves)


_CACHE = {}


def _cached(base, name):
  """The model of case ``name``, compressed once per test module."""
  if name not in _CACHE:
    _CACHE[name] = _compress(base, CASES[name])
  return _CACHE[name]


@pytest.fixture(params=sorted(CASES))
def case(request, base):
  return request.param, _cached(base, request.param)


def _hf_model(path, loader):
  """The export loaded by compressed-tensors: through transformers (decompressed on the first
  forward, or at load), or with the library's own API as transformers uses it (the config applied
  to the model, ``ModelCompressor.compress_model`` for the packed layout, the tensors loaded
  strictly, ``decompress_model``)."""
  if loader == 'transformers':
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
  elif loader == 'transformers_dequantize':
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
  else:
    config = transformers.AutoConfig.from_pretrained(str(path))
    qcfg = ct.quantization.QuantizationConfig.model_validate(config.quantization_config)
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ct.quantization.apply_quantization_config(model, qcfg)
    compressor = ct.compressors.ModelCompressor(quantization_config=qcfg)
    compressor.compress_model(model)
    model.load_state_dict(safetensors_torch.load_file(str(path / 'model.safetensors')),
                          strict=True)
    compressor.decompress_model(model)
  return model.eval()


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(np.array(tokens), dtype=torch.long)).logits.numpy()


def _our_logits(params, tokens, cfg):
  return np.asarray(llama.forward(params, jnp.asarray(tokens), cfg))


def _dense(leaf):
  return np.asarray(formats.to_dense(leaf), np.float32)


def _torch_weights(model):
  return {name[:-len('.weight')]: p.detach().numpy().T for name, p in model.named_parameters()
          if name.endswith('_proj.weight') and '.layers.' in name}


LOADERS = ('transformers', 'transformers_dequantize', 'model_compressor')


@pytest.mark.parametrize('loader', LOADERS)
def test_compressed_tensors_loads_the_export_and_matches_our_logits(base, case, tmp_path, loader):
  cfg, _, tokens, _ = base
  _, params = case
  path = export.save(tmp_path / 'ct', 'compressed-tensors', params, cfg)
  groups = json.loads((path / 'config.json').read_text())['quantization_config']['config_groups']
  if loader == 'transformers' and any(not g['weights']['symmetric'] for g in groups.values()):
    pytest.skip('transformers builds the packed layout of an asymmetric scheme with unpacked '
                'zero points and refuses the packed ones (the library\'s own checkpoints too)')
  if loader == 'transformers_dequantize' and len(groups) > 1:
    pytest.skip('transformers dequantizes every linear at load with the first config group')
  model = _hf_model(path, loader)
  got = _torch_logits(model, tokens)  # the first forward decompresses what is still compressed
  want = _our_logits(params, tokens, cfg)
  # The library's decompressed weights are ours, bit for bit.
  theirs = _torch_weights(model)
  for module, leaf in export.block_linears(params).items():
    np.testing.assert_array_equal(theirs[module], _dense(leaf), err_msg=module)
  np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0)
  assert not (tmp_path / 'ct.tmp').exists()


def _codes_and_zeros(q):
  """The codes ``[in, out]`` of a quantized weight and the zero point of each."""
  return np.asarray(q.ints()), np.asarray(q.zeros)[np.asarray(q.group_index())]


def _assert_same_grid(module, q, back):
  assert (back.bits, back.group_size, back.symmetric, back.in_features) == (
      q.bits, q.group_size, q.symmetric, q.in_features), module
  np.testing.assert_array_equal(back.scales, q.scales, err_msg=module)  # float32: exact
  np.testing.assert_array_equal(back.zeros, q.zeros, err_msg=module)
  assert q.g_idx is None and back.g_idx is None, module


def _assert_round_trip(module, leaf, back):
  """``back``, read from the export of ``leaf``, is ``leaf`` as far as the format holds it: the
  same dense weight, codes, scales and zeros; masks and 2:4 positions come back from the zeros of
  the written weight, so a kept entry that is zero (or whose code is the zero point) reads as
  pruned."""
  np.testing.assert_array_equal(_dense(back), _dense(leaf), err_msg=module)
  if not isinstance(leaf, formats.CompressedLinear):
    assert not isinstance(back, formats.LEAF_TYPES), module
    return
  w, b = leaf.weight, back.weight
  assert type(b) is type(w), module
  if isinstance(w, formats.Sparse24Weight):
    assert type(b.values) is type(w.values), module
    certain = np.ones(w.indices.shape, bool)  # kept entries whose position the file fixes
    if isinstance(w.values, formats.QuantizedWeight):
      _assert_same_grid(module, w.values, b.values)
      codes, zeros = _codes_and_zeros(w.values)
      certain = np.repeat((codes != zeros).reshape(-1, 2, codes.shape[1]).all(axis=1), 2, axis=0)
      np.testing.assert_array_equal(np.where(certain, b.values.ints(), 0),
                                    np.where(certain, codes, 0), err_msg=module)
    else:
      np.testing.assert_array_equal(b.values, w.values, err_msg=module)
    np.testing.assert_array_equal(np.where(certain, b.indices, 0), np.where(certain, w.indices, 0),
                                  err_msg=module)
    return
  if isinstance(w, formats.QuantizedWeight):
    _assert_same_grid(module, w, b)
    codes, zeros = _codes_and_zeros(w)
    if leaf.mask is not None:  # pruned entries are written with the zero point as their code
      codes = np.where(leaf.mask, codes, zeros)
    np.testing.assert_array_equal(b.ints(), codes, err_msg=module)
    nonzero = codes != zeros
  else:
    nonzero = _dense(leaf) != 0
  if leaf.mask is None:
    assert back.mask is None, module
  else:
    np.testing.assert_array_equal(back.mask, np.asarray(leaf.mask) & nonzero, err_msg=module)


def _export_and_read_back(params, cfg, path):
  """``(export dir, our reading of it)`` of a compressed-tensors export of ``params``, every
  block linear read back as :func:`_assert_round_trip` requires."""
  path = export.save(path, 'compressed-tensors', params, cfg)
  _, back = loading.load_hf_dir(path)
  theirs = export.block_linears(back)
  for module, leaf in export.block_linears(params).items():
    _assert_round_trip(module, leaf, theirs[module])
  return path, back


def test_round_trip_gives_the_same_leaves_and_the_same_bytes(base, case, tmp_path):
  cfg, _, tokens, _ = base
  _, params = case
  path, back = _export_and_read_back(params, cfg, tmp_path / 'a')
  np.testing.assert_array_equal(_our_logits(back, tokens, cfg), _our_logits(params, tokens, cfg))
  again = export.save(tmp_path / 'b', 'compressed-tensors', back, cfg)
  for f in ('config.json', 'model.safetensors'):
    assert (again / f).read_bytes() == (path / f).read_bytes(), f


def test_config_is_what_the_library_writes(base, case):
  """Our quantization_config validates as the library's own QuantizationConfig, one scheme per
  group, and names every quantized linear in exactly one group."""
  _, params = case
  linears = export.block_linears(params)
  qcfg = ct_format.quantization_config(linears)
  parsed = ct.quantization.QuantizationConfig.model_validate(qcfg)
  assert parsed.quantization_status == 'compressed'
  ct_format.check_config(qcfg)
  for module, leaf in linears.items():
    quantized = isinstance(leaf, formats.CompressedLinear) and (
        isinstance(leaf.weight, formats.QuantizedWeight)
        or isinstance(getattr(leaf.weight, 'values', None), formats.QuantizedWeight))
    assert (ct_format.scheme_for(module, qcfg) is not None) == quantized, module


def test_packing_is_the_library_pack_to_int32():
  """Our packed codes and zero points are the library's, for every width we read, on widths that
  are not multiples of 32."""
  helpers = ct.compressors.pack_quantized.helpers
  rng = np.random.default_rng(0)
  for bits in ct_format.READ_BITS:
    codes = rng.integers(0, 1 << bits, (24, 72))
    signed = torch.as_tensor(codes - (1 << (bits - 1)), dtype=torch.int8)
    for axis in (0, 1):
      ours = ct_format.pack_codes(codes, bits, axis)
      theirs = helpers.pack_to_int32(signed, bits, packed_dim=axis).numpy()
      np.testing.assert_array_equal(ours, theirs, err_msg=f'{bits} bits, axis {axis}')
      back = helpers.unpack_from_int32(torch.from_numpy(ours.copy()), bits, signed.shape,
                                       packed_dim=axis)
      np.testing.assert_array_equal(back.numpy(), signed.numpy())
      unpacked = ct_format.unpack_codes(theirs, bits, codes.shape[axis], axis)
      np.testing.assert_array_equal(unpacked, codes)


# ------------------------------------------------------------------------------------------------
# What the format cannot hold, and configs we cannot read.

def _kernel_path(module):
  """``model.layers.3.mlp.up_proj`` -> ``layers/3/mlp/up_proj/kernel``."""
  _, _, i, hf = module.split('.', 3)
  return tree.linear_path(int(i), '/'.join(loading.HF_LINEARS[hf]))


def _replace(params, path, leaf):
  return tree.replace_leaves(params, {path: leaf})


def test_unwritable_models_are_refused_before_writing(base, tmp_path):
  cfg, params, _, stats = base
  rtn4 = _cached(base, 'rtn_w4_sym_g32')
  path = 'layers/1/mlp/down_proj/kernel'
  w = tree.linear_leaves(params)[path]
  three = matrix.compress_matrix(w, stats[w.shape[0]], L(quant='rtn', qspec=QuantSpec(
      bits=3, group_size=32)))[0]
  act_order = matrix.compress_matrix(w, stats[w.shape[0]], L(
      quant='gptq', qspec=G32_SYM, act_order=True))[0]
  assert act_order.weight.g_idx is not None
  bad = [(_replace(rtn4, path, three),
          r'model\.layers\.1\.mlp\.down_proj is quantized to 3 bits'),
         (_replace(rtn4, path, act_order),
          r'model\.layers\.1\.mlp\.down_proj has an act-order g_idx'),
         (params, 'no block linear is quantized or sparse')]
  for model, match in bad:
    out = tmp_path / 'out'
    with pytest.raises(export.ExportError, match=match):
      export.save(out, 'compressed-tensors', model, cfg)
    assert not out.exists() and not (tmp_path / 'out.tmp').exists()


def test_a_shorter_last_group_is_refused_as_the_library_refuses_it(base, tmp_path):
  """A group size that does not divide the input width: compressed-tensors sizes its scales as
  ceil(in / group_size) groups but cannot quantize or dequantize such a weight, so no loader of
  the format could read it; the export refuses it in one line, from the static fields alone."""
  cfg, params, _, _ = base
  rtn4 = _cached(base, 'rtn_w4_sym_g32')
  path = 'layers/1/mlp/down_proj/kernel'
  w = jnp.asarray(tree.linear_leaves(params)[path], jnp.float32)  # 128 inputs
  ragged = formats.CompressedLinear(weight=quantize.rtn(w, QuantSpec(bits=4, group_size=48)))
  assert ragged.weight.scales.shape[0] == 3  # 48 + 48 + 32
  match = (r'^model\.layers\.1\.mlp\.down_proj has 128 inputs in groups of 48: '
           r'compressed-tensors cannot hold a shorter last group [^\n]*$')
  out = tmp_path / 'out'
  with pytest.raises(export.ExportError, match=match):
    export.save(out, 'compressed-tensors', _replace(rtn4, path, ragged), cfg)
  assert not out.exists()
  with pytest.raises(export.ExportError, match=match):
    ct_format.check_linears({'model.layers.1.mlp.down_proj': jax.eval_shape(lambda: ragged)})
  # What the library does with such a weight.
  args = ct.quantization.QuantizationArgs(num_bits=4, group_size=48, symmetric=False,
                                          strategy='group')
  with pytest.raises(ValueError, match='divisble by the given group_size'):
    ct.quantization.lifecycle.forward.dequantize(
        torch.zeros(8, 128), torch.ones(8, 3), torch.zeros(8, 3, dtype=torch.int8), args)


def _export_with_config(base, tmp_path, edit):
  cfg, _, _, _ = base
  params = _cached(base, 'rtn_w4_sym_g32')
  path = export.save(tmp_path / 'ct', 'compressed-tensors', params, cfg)
  config = json.loads((path / 'config.json').read_text())
  edit(config['quantization_config'])
  (path / 'config.json').write_text(json.dumps(config))
  return path


def _group(q):
  return q['config_groups']['group_0']


def _set(d, **kv):
  d.update(kv)


BAD_CONFIGS = {
    'naive_format': (lambda q: _set(_group(q), format='naive-quantized'),
                     "format 'naive-quantized'"),
    'w4a8': (lambda q: _set(_group(q), input_activations={'num_bits': 8, 'type': 'int'}),
             'quantizes input_activations'),
    'float_weights': (lambda q: _set(_group(q)['weights'], type='float'), 'float weights'),
    'six_bits': (lambda q: _set(_group(q)['weights'], num_bits=6), 'num_bits=6'),
    'old_three_bits': (lambda q: (_set(_group(q)['weights'], num_bits=3),
                                  _set(q, version='0.17.1')), 'packing changed in 0.18'),
    'tensor_strategy': (lambda q: _set(_group(q)['weights'], strategy='tensor',
                                       group_size=None), "strategy 'tensor'"),
    'block_strategy': (lambda q: _set(_group(q)['weights'], strategy='block'),
                       "strategy 'block'"),
    'preset': (lambda q: _set(q, config_groups={'W4A16': ['Linear']}), 'preset'),
    'kv_cache': (lambda q: _set(q, kv_cache_scheme={'num_bits': 8}), 'KV cache'),
    'transforms': (lambda q: _set(q, transform_config={'config_groups': {'u': {}}}),
                   'transforms'),
    'sparsity_format': (lambda q: _set(q, sparsity_config={'format': 'marlin-24'}),
                        "sparsity format 'marlin-24'"),
    'not_ct': (lambda q: _set(q, quant_method='awq'), "quantization method 'awq'"),
    # 64 inputs in groups of 48: a shorter last group, which the library cannot dequantize.
    'ragged_groups': (lambda q: _set(_group(q)['weights'], group_size=48),
                      'groups of 48: compressed-tensors cannot dequantize a shorter last group'),
}


@pytest.mark.parametrize('bad', sorted(BAD_CONFIGS))
def test_configs_we_cannot_read_are_refused(base, tmp_path, bad):
  edit, match = BAD_CONFIGS[bad]
  path = _export_with_config(base, tmp_path, edit)
  with pytest.raises(ValueError, match=match):
    loading.load_hf_dir(path)


def test_a_linear_named_24_that_is_not_is_refused(base, tmp_path):
  cfg, params, _, _ = base
  rtn4 = _cached(base, 'rtn_w4_sym_g32')
  dense_down = _replace(rtn4, 'layers/0/mlp/down_proj/kernel', params['layers'][0]['mlp'][
      'down_proj']['kernel'])
  path = export.save(tmp_path / 'ct', 'compressed-tensors', dense_down, cfg)
  config = json.loads((path / 'config.json').read_text())
  config['quantization_config']['sparsity_config'] = {
      'format': 'dense', 'sparsity_structure': '2:4', 'targets': ['model.layers.0.mlp.down_proj']}
  (path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r'model\.layers\.0\.mlp\.down_proj is named 2:4 sparse'):
    loading.load_hf_dir(path)


# ------------------------------------------------------------------------------------------------
# Checkpoints the library writes (and the layouts older versions wrote) load into our leaves.

def _torch_model(base):
  cfg, params, _, _ = base
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**export.hf_config(cfg)))
  model = model.float().eval()
  state = {k: torch.as_tensor(np.array(v)) for k, v in export.hf_state_dict(params, cfg).items()}
  model.load_state_dict(state)
  return model


def _library_checkpoint(base, out, schemes):
  """A checkpoint written by compressed-tensors' own compressor: ``schemes`` applied to the
  model, min/max qparams per group, ``ModelCompressor`` compression, ``save_pretrained``."""
  model = _torch_model(base)
  qcfg = ct.quantization.QuantizationConfig(config_groups=schemes, ignore=['lm_head'])
  ct.quantization.apply_quantization_config(model, qcfg)
  for _, m in model.named_modules():
    if not hasattr(m, 'weight_scale'):
      continue
    args = m.quantization_scheme.weights
    w = m.weight.data
    groups = w.reshape(w.shape[0], -1, args.group_size or w.shape[1])
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    half = 1 << (args.num_bits - 1)
    if args.symmetric:
      scale, zp = torch.maximum(-lo, hi) / (half - 0.5), torch.zeros_like(lo)
    else:
      scale = (hi - lo) / ((1 << args.num_bits) - 1)
      zp = (torch.round(-lo / scale) - half).clamp(-half, half - 1)
    m.weight_scale.data = scale.reshape(m.weight_scale.shape)
    m.weight_zero_point.data = zp.reshape(m.weight_zero_point.shape).to(torch.int8)
    m.quantization_status = ct.quantization.QuantizationStatus.FROZEN
  compressor = ct.compressors.ModelCompressor.from_pretrained_model(
      model, quantization_format='pack-quantized')
  compressor.compress_model(model)
  model.save_pretrained(str(out))
  compressor.update_config(str(out))
  return model


def _scheme(targets, bits, group_size, symmetric):
  args = ct.quantization.QuantizationArgs(
      num_bits=bits, group_size=group_size, symmetric=symmetric,
      strategy='group' if group_size else 'channel')
  return ct.quantization.QuantizationScheme(targets=targets, weights=args)


LIBRARY_CASES = {
    'w4_asym_g32_attn_w8_sym_channel_mlp': lambda: {
        'group_0': _scheme([r're:.*self_attn\..*'], 4, 32, False),
        'group_1': _scheme([r're:.*mlp\..*'], 8, None, True)},
    'w3_sym_g32': lambda: {'group_0': _scheme(['Linear'], 3, 32, True)},
    'w2_asym_channel': lambda: {'group_0': _scheme(['Linear'], 2, None, False)},
}


@pytest.mark.parametrize('name', sorted(LIBRARY_CASES))
def test_library_checkpoint_loads_into_our_leaves(base, tmp_path, name):
  cfg, _, tokens, _ = base
  model = _library_checkpoint(base, tmp_path / 'lib', LIBRARY_CASES[name]())
  want = _torch_logits(model, tokens)  # the first forward decompresses the model
  theirs = _torch_weights(model)
  _, params = loading.load_hf_dir(tmp_path / 'lib')
  for module, leaf in export.block_linears(params).items():
    assert isinstance(leaf.weight, formats.QuantizedWeight), module
    np.testing.assert_array_equal(_dense(leaf), theirs[module], err_msg=module)
  got = _our_logits(params, tokens, cfg)
  np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0)


def _legacy_checkpoint(base, out, sparse_format, masks):
  """A checkpoint in the layout compressed-tensors < 0.15 wrote for ``sparse_format`` (its
  compressors' three lines, with the library's ``pack_bitmasks``), from the masked model."""
  cfg, params, _, _ = base
  path = export.save_hf(out, params, cfg)
  state = {k: torch.as_tensor(np.array(v)) for k, v in export.hf_state_dict(params, cfg).items()}
  dense = {}
  for module, mask in masks.items():
    m = torch.as_tensor(mask)
    w = state.pop(f'{module}.weight') * m
    dense[module] = w.numpy().T
    state[f'{module}.bitmask'] = ct.utils.pack_bitmasks(m)
    if sparse_format == 'sparse-24-bitmask':
      state[f'{module}.compressed'] = w[m].reshape(w.shape[0], -1)
      state[f'{module}.shape'] = torch.tensor(w.shape).reshape(-1, 1)
    else:
      counts = m.sum(dim=-1)
      state[f'{module}.compressed'] = w[m]
      state[f'{module}.shape'] = torch.tensor(w.shape)
      state[f'{module}.row_offsets'] = torch.cumsum(counts, 0) - counts
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()},
                              str(path / 'model.safetensors'), metadata={'format': 'pt'})
  config = json.loads((path / 'config.json').read_text())
  config['quantization_config'] = {
      'quant_method': 'compressed-tensors', 'format': 'dense', 'config_groups': {},
      'version': '0.12.2', 'sparsity_config': {
          'format': sparse_format, 'targets': ['Linear'], 'ignore': ['lm_head'],
          'sparsity_structure': '2:4' if sparse_format == 'sparse-24-bitmask' else 'unstructured'}}
  (path / 'config.json').write_text(json.dumps(config))
  return path, dense


@pytest.mark.parametrize('sparse_format', ['sparse-24-bitmask', 'sparse-bitmask'])
def test_legacy_bitmask_checkpoint_loads_into_our_leaves(base, tmp_path, sparse_format):
  cfg, params, tokens, _ = base
  rng = np.random.default_rng(1)
  masks = {}
  for module, leaf in export.block_linears(params).items():
    out_f, in_f = leaf.shape[1], leaf.shape[0]
    if sparse_format == 'sparse-24-bitmask':  # the two largest of every 4, as the library chose
      w = np.abs(np.asarray(leaf).T).reshape(out_f, in_f // 4, 4)
      top = np.argsort(-w, axis=-1)[..., :2]
      mask = np.zeros_like(w, bool)
      np.put_along_axis(mask, top, True, axis=-1)
      masks[module] = mask.reshape(out_f, in_f)
    else:
      masks[module] = rng.random((out_f, in_f)) < 0.5
  path, dense = _legacy_checkpoint(base, tmp_path / 'legacy', sparse_format, masks)
  _, back = loading.load_hf_dir(path)
  for module, leaf in export.block_linears(back).items():
    kind = formats.Sparse24Weight if sparse_format == 'sparse-24-bitmask' else jax.Array
    assert isinstance(leaf.weight, kind), module
    np.testing.assert_array_equal(_dense(leaf), dense[module], err_msg=module)
    if sparse_format == 'sparse-bitmask':
      np.testing.assert_array_equal(leaf.mask, masks[module].T, err_msg=module)
  want = tree.replace_leaves(params, {_kernel_path(m): jnp.asarray(d) for m, d in dense.items()})
  np.testing.assert_allclose(_our_logits(back, tokens, cfg), _our_logits(want, tokens, cfg),
                             atol=1e-6, rtol=0)


def test_legacy_act_order_g_idx_is_read(base, tmp_path):
  """``actorder: "group"`` checkpoints (before compressed-tensors dropped it) carry
  ``weight_g_idx``, the group of each input; we keep it as our g_idx."""
  cfg, _, _, _ = base
  params = _cached(base, 'rtn_w4_sym_g32')
  path = export.save(tmp_path / 'ct', 'compressed-tensors', params, cfg)
  state = safetensors_numpy.load_file(str(path / 'model.safetensors'))
  module = 'model.layers.0.mlp.down_proj'
  in_f = cfg.intermediate_size
  g_idx = np.random.default_rng(2).permutation(np.arange(in_f) // 32).astype(np.int32)
  state[f'{module}.weight_g_idx'] = g_idx
  safetensors_numpy.save_file(state, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  config = json.loads((path / 'config.json').read_text())
  config['quantization_config']['config_groups']['group_0']['weights']['actorder'] = 'group'
  config['quantization_config']['version'] = '0.12.2'
  (path / 'config.json').write_text(json.dumps(config))
  _, back = loading.load_hf_dir(path)
  q = back['layers'][0]['mlp']['down_proj']['kernel'].weight
  np.testing.assert_array_equal(q.g_idx, g_idx)
  codes = ct_format.unpack_codes(state[f'{module}.weight_packed'], 4, in_f, axis=1).T
  scales = state[f'{module}.weight_scale'].T
  np.testing.assert_array_equal(_dense(q), (codes - 8).astype(np.float32) * scales[g_idx])


def test_the_main_command_refuses_what_compressed_tensors_cannot_hold_before_any_work(tmp_path):
  """The refusals from the flags alone, through the abstract leaves the rules will make."""
  from experiments import config as run_config  # pylint: disable=g-import-not-at-top
  base = dict(model='tiny-llama', calib_data='shakespeare', eval_data=('shakespeare',),
              calib_seqlen=32, eval_seqlen=32, group_size=32, probes='none',
              export='compressed-tensors')
  bad = {
      'quantized to 3 bits': dict(quant='gptq', bits=3),
      'has an act-order g_idx': dict(quant='gptq', bits=4, act_order=True),
      'cannot hold the low-rank adapters': dict(quant='rtn', bits=4, recover='svd', rank=8),
  }
  for want, flags in bad.items():
    problems = run_config.validate(run_config.CompressConfig(**base, **flags),
                                   out_dir=str(tmp_path / 'run'))
    assert any(want in p for p in problems), (want, problems)
  for flags in (dict(prune='sparsegpt', sparsity='2:4', quant='gptq', bits=4),
                dict(prune='wanda', sparsity='2:4'),
                dict(quant='gptq', bits=4, act_order=True, static_groups=True)):
    assert run_config.validate(run_config.CompressConfig(**base, **flags),
                               out_dir=str(tmp_path / 'run')) == [], flags


# ------------------------------------------------------------------------------------------------
# Phi-3: its fused qkv_proj and gate_up_proj, one packed matrix each.

# The Llama cases; 'mixed' with the parts of each fused module alike.
PHI3_CASES = dict(CASES, mixed=[
    (r'layers/0/self_attn/.*', L(quant='rtn', qspec=G32)),
    (r'layers/0/mlp/.*', L(quant='rtn', qspec=QuantSpec(bits=8, group_size=-1, symmetric=True))),
    (r'layers/1/self_attn/o_proj/.*', L(prune='wanda', sparsity=UNSTRUCTURED)),
    (r'layers/1/self_attn/.*', L(prune='wanda', sparsity=UNSTRUCTURED, quant='rtn',
                                 qspec=QuantSpec(bits=2, group_size=32))),
    (r'layers/1/mlp/(gate|up)_proj/.*', L(quant='rtn', qspec=G32)),
    (r'layers/1/mlp/down_proj/.*', None)])


@pytest.fixture(scope='module')
def phi3_base(tmp_path_factory):
  """A tiny random Phi-3 (transformers' Phi3Config, saved and loaded: its fused matrices split),
  token windows and one Hessian of random inputs per input width."""
  path = families.save('phi3', tmp_path_factory.mktemp('phi3'))
  return _with_windows_and_stats(*loading.load_hf_dir(path), 20)


def _phi3_cached(phi3_base, name):
  if ('phi3', name) not in _CACHE:
    _CACHE['phi3', name] = _compress(phi3_base, PHI3_CASES[name])
  return _CACHE['phi3', name]


@pytest.fixture(params=sorted(PHI3_CASES))
def phi3_case(request, phi3_base):
  return request.param, _phi3_cached(phi3_base, request.param)


def _hf_weights(params, cfg):
  """Our dense weight ``[in, out]`` of every Hugging Face block module, fused ones side by side."""
  return {name[:-len('.weight')]: w.T for name, w in export.hf_state_dict(
      params, cfg, merge_adapters=False).items() if name.endswith('_proj.weight')}


@pytest.mark.parametrize('loader', LOADERS)
def test_phi3_compressed_tensors_loads_the_export_and_matches_our_logits(phi3_base, phi3_case,
                                                                         tmp_path, loader):
  cfg, _, tokens, _ = phi3_base
  name, params = phi3_case
  path = export.save(tmp_path / 'ct', 'compressed-tensors', params, cfg)
  qcfg = json.loads((path / 'config.json').read_text())['quantization_config']
  groups = qcfg['config_groups']
  if loader == 'transformers' and any(not g['weights']['symmetric'] for g in groups.values()):
    pytest.skip('transformers builds the packed layout of an asymmetric scheme with unpacked '
                'zero points and refuses the packed ones (the library\'s own checkpoints too)')
  if loader == 'transformers_dequantize' and len(groups) > 1:
    pytest.skip('transformers dequantizes every linear at load with the first config group')
  tensors = safetensors_numpy.load_file(str(path / 'model.safetensors'))
  assert not any('.q_proj.' in t or '.gate_proj.' in t for t in tensors)
  model = _hf_model(path, loader)
  got = _torch_logits(model, tokens)
  want = _our_logits(params, tokens, cfg)
  theirs, ours = _torch_weights(model), _hf_weights(params, cfg)
  assert set(theirs) == set(ours) and 'model.layers.0.self_attn.qkv_proj' in theirs
  for module, w in ours.items():  # bit for bit, the fused ones too
    np.testing.assert_array_equal(theirs[module], w, err_msg=module)
  print(f'phi3 {name} {loader}: max |logit diff| {np.abs(got - want).max():.2e} of '
        f'{np.abs(want).max():.2f}')
  np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0)


def test_phi3_round_trip_gives_the_same_leaves_and_the_same_bytes(phi3_base, phi3_case,
                                                                  tmp_path):
  """The export read back: the q/k/v and gate/up leaves are ours (codes, float32 scales, zeros,
  masks and 2:4 as the format holds them), each the exact columns of its fused matrix, and a
  second export is the same files."""
  cfg, _, tokens, _ = phi3_base
  _, params = phi3_case
  path, back = _export_and_read_back(params, cfg, tmp_path / 'a')
  qcfg = json.loads((path / 'config.json').read_text())['quantization_config']
  f = loading.SafetensorsFile(path / 'model.safetensors')
  for i in range(cfg.num_layers):
    for hf, lins in loading.HF_FUSED.items():
      module = f'model.layers.{i}.{hf}'
      parts = np.concatenate([_dense(tree.get_linear(back['layers'][i], lin)) for lin in lins], 1)
      if f'{module}.weight_packed' in f.keys():
        fused = _dense(ct_format.read_linear(module, f.get, cfg.hidden_size, qcfg))
      else:
        fused = f.get(f'{module}.weight').T
      np.testing.assert_array_equal(parts, fused, err_msg=module)
  np.testing.assert_array_equal(_our_logits(back, tokens, cfg), _our_logits(params, tokens, cfg))
  again = export.save(tmp_path / 'b', 'compressed-tensors', back, cfg)
  for name in ('config.json', 'model.safetensors'):
    assert (again / name).read_bytes() == (path / name).read_bytes(), name


def test_phi3_parts_that_cannot_be_one_matrix_are_refused(phi3_base, tmp_path):
  """A fused module is one matrix: parts compressed differently are refused before anything is
  written, naming the module and the difference; what the format refuses on the fused matrix
  names its parts."""
  cfg, params, _, stats = phi3_base
  rtn4 = _phi3_cached(phi3_base, 'rtn_w4_sym_g32')

  def leaf(path, spec):
    w = tree.linear_leaves(params)[path]
    return matrix.compress_matrix(w, stats[w.shape[0]], spec, path)[0]
  q1, k1, up1 = ('layers/1/self_attn/q_proj/kernel', 'layers/1/self_attn/k_proj/kernel',
                 'layers/1/mlp/up_proj/kernel')
  qkv, gate_up = r'model\.layers\.1\.self_attn\.qkv_proj', r'model\.layers\.1\.mlp\.gate_up_proj'
  fused = f'{qkv} holds q_proj, k_proj, v_proj fused into one matrix, but '
  bad = [
      ({q1: leaf(q1, L(quant='rtn', qspec=QuantSpec(bits=8, group_size=-1, symmetric=True)))},
       rf'^{fused}k_proj is 4-bit and q_proj 8-bit: [^\n]*$'),
      ({k1: leaf(k1, L(quant='rtn', qspec=G32))}, f'{fused}k_proj is asymmetric and q_proj '
       'symmetric'),
      ({k1: leaf(k1, L(prune='wanda', sparsity=UNSTRUCTURED, quant='rtn', qspec=G32_SYM))},
       f'{fused}k_proj is quantized with a pruning mask and q_proj quantized'),
      ({up1: leaf(up1, L(prune='wanda', sparsity=SPARSE24))},
       f'{gate_up} holds gate_proj, up_proj fused into one matrix, but up_proj is 2:4 sparse and '
       'gate_proj quantized'),
      ({p: leaf(p, L(quant='gptq', qspec=G32_SYM, act_order=True)) for p in
        ('layers/1/mlp/gate_proj/kernel', up1)},
       rf'^{gate_up} \(fused gate_proj, up_proj\) has an act-order g_idx: '),
  ]
  for leaves, match in bad:
    out = tmp_path / 'out'
    with pytest.raises(export.ExportError, match=match):
      export.save(out, 'compressed-tensors', tree.replace_leaves(rtn4, leaves), cfg)
    assert not out.exists() and not (tmp_path / 'out.tmp').exists()


def test_the_main_command_refuses_unfusable_phi3_parts_before_any_work(tmp_path):
  """From the flags alone: a rule that gives q_proj other bits than k_proj and v_proj cannot be
  written as Phi-3's one qkv_proj matrix; the same parts under one rule can."""
  from experiments import config as run_config  # pylint: disable=g-import-not-at-top
  model = families.save('phi3', tmp_path / 'phi3')
  base = dict(model=str(model), calib_data='shakespeare', eval_data=('shakespeare',),
              calib_seqlen=32, eval_seqlen=32, group_size=32, probes='none', quant='rtn', bits=4,
              export='compressed-tensors')
  problems = run_config.validate(run_config.CompressConfig(
      **base, rules=(r'.*/q_proj/kernel=8',)), out_dir=str(tmp_path / 'run'))
  assert any('qkv_proj' in p and '8-bit' in p for p in problems), problems
  assert run_config.validate(run_config.CompressConfig(**base),
                             out_dir=str(tmp_path / 'run')) == []
