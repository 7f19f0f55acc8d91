r"""Export a model, or the result of a run of ``experiments.compress``, to a format other tools load.

  python -m experiments.export --from=results/gptq3_eora64 --format=hf --out=exports/gptq3_eora64

``--from`` takes an output directory of ``experiments.compress`` (the model its ``--save`` wrote,
as recorded in its ``results.json``), a ``--save`` directory, a model name, a Hugging Face
directory or a ``.gguf``. Formats: ``hf`` (dense safetensors + ``config.json`` + the tokenizer's
files, loaded by ``transformers.AutoModelForCausalLM.from_pretrained``; adapters merged, or left
out with ``--nomerge_adapters``); ``gptq`` and ``compressed-tensors`` (the quantized and 2:4
linears packed as those libraries do, loaded by transformers' integrations of them, vLLM and
SGLang; adapters cannot be merged into packed weights, so a model with adapters needs
``--nomerge_adapters`` or ``--format=peft``); ``peft`` (``OUT/base``: the ``--peft_base`` export
(``hf``, ``gptq`` or ``compressed-tensors``) without adapters, ``OUT/adapter``: the adapters as a
PEFT LoRA, ``peft.PeftModel.from_pretrained(base, adapter)``).
A non-empty ``--out`` is refused unless ``--overwrite``; a half-written export never carries the
final name.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Sequence

from absl import app, flags

from experiments import common
from models import export
from models import loading


def model_of(source: str) -> str:
  """The model a ``--from`` names: a run's saved model, or ``source`` itself."""
  results = pathlib.Path(source) / 'results.json'
  if results.exists():
    saved = json.loads(results.read_text()).get('saved_to')
    if not saved:
      raise export.ExportError(f'--from={source} is a run without a saved model: rerun it with '
                               '--save=DIR (or --export=FORMAT)')
    return saved
  return source


def run(*, source: str, fmt: str, out: str, merge_adapters: bool = True, peft_base: str = 'hf',
        overwrite: bool = False) -> pathlib.Path:
  """Exports ``source`` to ``out`` in format ``fmt``; every check comes before any work."""
  if fmt not in export.FORMATS:
    raise export.ExportError(f'--format={fmt!r} is not one of {export.FORMATS}')
  if peft_base not in export.PEFT_BASES:
    raise export.ExportError(f'--peft_base={peft_base!r} is not one of {export.PEFT_BASES}')
  export.check_output_dir(out, overwrite)
  loaded = loading.load_model(model_of(source))
  return export.save(out, fmt, loaded.params, loaded.config, tokenizer=loaded.tokenizer(),
                     merge_adapters=merge_adapters, peft_base=peft_base, overwrite=overwrite)


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('from', None, 'Run directory, --save directory, model name or path.')
  flags.DEFINE_enum('format', 'hf', export.FORMATS, 'Export format.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_bool('merge_adapters', True, 'Merge low-rank adapters into the weights '
                    '(--nomerge_adapters: leave them out).')
  flags.DEFINE_enum('peft_base', 'hf', export.PEFT_BASES,
                    'With --format=peft: the format of OUT/base.')
  flags.DEFINE_bool('overwrite', False, 'Replace a non-empty output directory.')


def main(argv: Sequence[str]):
  del argv
  common.quiet_logs()
  if not FLAGS['from'].value or not FLAGS.out:
    print('error: --from and --out are required', file=sys.stderr)
    return 2
  try:
    path = run(source=FLAGS['from'].value, fmt=FLAGS.format, out=FLAGS.out,
               merge_adapters=FLAGS.merge_adapters, peft_base=FLAGS.peft_base,
               overwrite=FLAGS.overwrite)
  except (export.ExportError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
