"""A TFDS builder for VGGFace2 (not in the TFDS catalogue), writing array_record files without TensorFlow.

Prepare (once; the images must be downloaded by hand after registering at the dataset's site):

  python -m fct_jax.data.vggface2_builder --data_dir=$DATA --manual_dir=$VGGFACE2

(or, with TensorFlow installed, ``tfds build fct_jax/data/vggface2_builder.py --data_dir=$DATA
--manual_dir=$VGGFACE2 --file_format=array_record``)
where ``$VGGFACE2`` holds the extracted ``train/<subject>/<image>.jpg`` and ``test/<subject>/<image>.jpg`` folders
and, optionally, ``bb_landmark/loose_bb_{train,test}.csv`` (the loose face boxes; without them the box is the
whole image).

Labels: the train subjects in sorted id order are 0..8630 (so "the first 10% of subjects", VGGFace2-863, is
``label < 863``); the 500 test subjects — the paper's "validation set" — follow as 8631..9130 (disjoint identities;
retrieval needs only label equality). ``bbox`` is the loose box ``(x, y, w, h)`` in pixels.
"""

import argparse
import csv
import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_TRAIN_SUBJECTS = 8631
NUM_TEST_SUBJECTS = 500


def _read_boxes(path: epath.Path):
  if not path.exists():
    return {}
  with path.open() as f:
    rows = csv.reader(f)
    next(rows, None)  # header NAME_ID,X,Y,W,H
    return {r[0]: np.asarray([float(v) for v in r[1:5]], np.float32) for r in rows if len(r) >= 5}


class Vggface2(tfds.core.GeneratorBasedBuilder):
  """VGGFace2 (Cao et al. 2018): 3.31M face images of 9,131 subjects (8,631 train, 500 test)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original images, loose face boxes, sorted-subject labels."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download vggface2_train.tar.gz, vggface2_test.tar.gz and bb_landmark.tar.gz from the VGGFace2 site and "
      "extract them into manual_dir so that it contains train/, test/ and bb_landmark/.")

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    # Nothing is downloaded. (tfds' default looks for a checksums file next to the module through
    # `code_path`, which needs the `importlib_resources` backport for non-tfds packages.)
    return None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=NUM_TRAIN_SUBJECTS + NUM_TEST_SUBJECTS),
            "subject": tfds.features.Text(),
            "file_name": tfds.features.Text(),
            "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.robots.ox.ac.uk/~vgg/data/vgg_face2/",
    )

  def _split_generators(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir)
    train_subjects = self._subjects(root / "train")
    return {
        "train": self._generate_examples(root, "train", 0),
        # Test labels follow the train labels, so the two identity sets never share a label.
        "test": self._generate_examples(root, "test", len(train_subjects)),
    }

  @staticmethod
  def _subjects(folder: epath.Path):
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []

  def _generate_examples(self, root: epath.Path, split: str, label_offset: int):
    boxes = _read_boxes(root / "bb_landmark" / f"loose_bb_{split}.csv")
    for label, subject in enumerate(self._subjects(root / split)):
      for path in sorted((root / split / subject).glob("*.jpg")):
        name = f"{subject}/{path.stem}"
        # Encoded bytes, not a path: TFDS then stores them as they are and needs no TensorFlow to encode.
        yield name, {"image": io.BytesIO(path.read_bytes()), "label": label_offset + label, "subject": subject,
                     "file_name": f"{name}.jpg", "bbox": boxes.get(name, np.zeros((4,), np.float32))}


def prepare(data_dir: str, manual_dir: str):
  """Builds the array_record dataset into ``data_dir`` from the extracted archives in ``manual_dir``."""
  builder = Vggface2(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write (local or gs://)")
  parser.add_argument("--manual_dir", required=True, help="folder with train/, test/ and bb_landmark/")
  args = parser.parse_args()
  prepare(args.data_dir, args.manual_dir)
