r"""Loads exports with the libraries they are for, in a process of their own: the proof that an
export works elsewhere.

  python -m experiments.third_party JOBS.json

``JOBS.json`` lists jobs; each writes what the library computed, for the caller to compare with
ours:

* ``{"base": DIR, "adapter": DIR or null, "tokens": NPY, "out": NPY, "weight": MODULE or null}``:
  ``DIR`` loaded by ``transformers.AutoModelForCausalLM.from_pretrained`` in float32 on the CPU
  (a GPTQ checkpoint through transformers' GPTQ integration, i.e. GPTQModel, with its plain torch
  kernel; compressed-tensors through transformers' compressed-tensors integration, decompressed
  at load), the adapter
  by ``peft.PeftModel.from_pretrained``; the logits on the tokens go to ``out``, and the weight of
  ``MODULE`` (``[out, in]``, as the library dequantizes it) to ``out`` + ``.w.npy``.
* ``{"pack": NPZ, "out": NPZ}``: GPTQModel's own packer, from float weights: for every
  ``MODULE.w`` ``[out, in]`` (with ``MODULE.scales``, ``MODULE.zeros`` ``[groups, out]``,
  ``MODULE.g_idx`` and the ``bits`` / ``group_size`` entries) it writes ``MODULE.qweight``,
  ``MODULE.qzeros_v2`` (GPTQModel's zero-point convention) and ``MODULE.qzeros_v1`` (its v2 -> v1
  conversion): a GPTQ checkpoint another tool wrote, for our importer.

A process of its own keeps GPTQModel's import-time set-up out of the caller's.
"""

import json
import sys
import types

import numpy as np
import torch
import transformers


def load(base: str, adapter: str | None = None):
  """The model of an export directory as the third-party libraries load it."""
  config = json.loads(open(f'{base}/config.json').read())
  qcfg = config.get('quantization_config') or {}
  kwargs = {}
  if qcfg.get('quant_method') == 'gptq':
    # The file's quantization_config is used; only the kernel choice (a loading attribute) is
    # ours: GPTQModel's plain torch kernel, which needs no compiled extension.
    kwargs['quantization_config'] = transformers.GPTQConfig(bits=qcfg['bits'], backend='torch')
  elif qcfg.get('quant_method') == 'compressed-tensors' and len(qcfg.get('config_groups')
                                                                  or {}) <= 1:
    # transformers' compressed (not decompressed) path expects unpacked asymmetric zero points,
    # unlike compressed-tensors itself and vLLM: it refuses the library's own asymmetric files.
    # Decompressing at load reads them as the library writes them (for one config group).
    kwargs['quantization_config'] = transformers.CompressedTensorsConfig(dequantize=True)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      base, dtype=torch.float32, device_map='cpu', **kwargs)
  if adapter:
    import peft  # pylint: disable=g-import-not-at-top
    model = peft.PeftModel.from_pretrained(model, adapter)
  return model.eval()


def weight(model, module: str) -> np.ndarray:
  """``[out, in]`` float32 weight of a linear, as the library dequantizes it."""
  base = model.get_base_model() if hasattr(model, 'get_base_model') else model
  layer = base.get_submodule(module)
  layer = getattr(layer, 'base_layer', layer)
  if hasattr(layer, 'dequantize_weight'):
    return layer.dequantize_weight().float().numpy()
  return layer.weight.detach().float().numpy()


def pack(job) -> None:
  """GPTQModel's packer on float weights (see the module docstring)."""
  from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # pylint: disable=g-import-not-at-top
  from gptqmodel.utils import model as gptqmodel_model  # pylint: disable=g-import-not-at-top
  data = np.load(job['pack'])
  bits, group_size = int(data['bits']), int(data['group_size'])
  out = {}
  for module in sorted({k.rsplit('.', 1)[0] for k in data.files if k.endswith('.w')}):
    w = torch.as_tensor(data[f'{module}.w'])
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w
    qlinear = TorchLinear(bits=bits, group_size=group_size, sym=False, desc_act=True,
                          in_features=w.shape[1], out_features=w.shape[0], bias=False)
    qlinear.pack(linear, scales=torch.as_tensor(data[f'{module}.scales']).T,
                 zeros=torch.as_tensor(data[f'{module}.zeros']).T,
                 g_idx=torch.as_tensor(data[f'{module}.g_idx'], dtype=torch.int32))
    out[f'{module}.qweight'] = qlinear.qweight.numpy().copy()
    out[f'{module}.qzeros_v2'] = qlinear.qzeros.numpy().copy()
    gptqmodel_model.convert_gptq_v2_to_v1_format_module(
        qlinear, types.SimpleNamespace(bits=bits, pack_dtype=torch.int32))
    out[f'{module}.qzeros_v1'] = qlinear.qzeros.numpy().copy()
  np.savez(job['out'], **out)


def main(jobs_file: str) -> None:
  for job in json.loads(open(jobs_file).read()):
    if 'pack' in job:
      pack(job)
      continue
    model = load(job['base'], job.get('adapter'))
    if job.get('weight'):
      np.save(job['out'] + '.w.npy', weight(model, job['weight']))
    with torch.no_grad():
      tokens = torch.as_tensor(np.load(job['tokens']), dtype=torch.long)
      np.save(job['out'], model(tokens).logits.float().numpy())


if __name__ == '__main__':
  main(sys.argv[1])
