"""A tiny tfds dataset ("mesanet_tiny_text": train 40, validation 8 English sentences) written as ArrayRecord into
a directory of the test's choosing; tensorflow-datasets prepares it without TensorFlow."""
import tensorflow_datasets as tfds

SENTENCES = ("The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with one step.",
             "All that glitters is not gold.", "Fortune favours the bold.")


class MesanetTinyText(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40), "validation": self._generate_examples(8)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"text": f"{i}: {SENTENCES[i % len(SENTENCES)]}"}


def prepare(data_dir: str) -> str:
  MesanetTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return "mesanet_tiny_text"
