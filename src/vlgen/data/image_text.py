"""Image-caption data: COCO-style annotation files plus an image folder, as a LightningDataModule.

Annotation files are a JSON list or JSONL of records with ``image`` (path relative to the image root), ``caption``
(a string or a list, as in the COCO Karpathy files) and an optional ``image_id`` (default: the image path).
Training yields one sample per (image, caption) pair; validation, test and predict-from-test yield one sample per
image with all of its captions as references (records are grouped by ``image_id``). Batches carry raw strings (the
model tokenises) and images transformed as the model's encoder expects: the module asks the attached
LightningModule for ``image_transform(train)``. Unusable records and unreadable images are skipped and counted
(see :mod:`vlgen.data.common`); :mod:`vlgen.data.captions` holds the split, loader and summary logic shared with
the video module. Images are read by :func:`vlgen.data.images.to_rgb` (EXIF orientation applied, 16-bit and float
greyscale scaled by their range, transparency on white, the first frame of a GIF).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from vlgen.data.captions import CaptionDataModule, CaptionItem, Transform, caption_sample
from vlgen.data.common import BadFiles, CaptionSample
from vlgen.data.images import to_rgb
from vlgen.data.synthetic.shapes import ShapesWorld
from vlgen.data.vqa import VQATask

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"})  # GIF: 1st frame
ImageItem = CaptionItem  # the image path is ``item.path``


class ImageCaptionDataset(Dataset):
    """Loads and transforms the images of :class:`ImageItem` s; an unreadable image comes back as ``None``.

    Args:
        items: the samples.
        image_root: directory the items' image paths are relative to.
        transform: PIL RGB image -> tensor ``[C, H, W]``.
        strict: raise on an unreadable image instead of skipping it.
    """

    def __init__(self, items: list[ImageItem], image_root: Path, transform: Transform, strict: bool) -> None:
        self.items, self.image_root, self.transform = items, image_root, transform
        self.bad_files = BadFiles(strict)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> CaptionSample | None:
        item = self.items[index]
        path = self.image_root / item.path
        try:
            with Image.open(path) as img:
                rgb = to_rgb(img)  # decodes the whole file: a truncated one fails here, not in the model
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            self.bad_files(str(path), err)
            return None
        return caption_sample(item, self.transform(rgb))


class ImageTextDataModule(CaptionDataModule):
    """COCO-style image-caption splits from one root.

    Args:
        root: directory holding the annotation files (and the images unless ``image_root`` is given).
        train_file: training annotations, relative to ``root`` (null: no training split).
        val_file: validation annotations (null: no validation).
        test_file: test annotations.
        image_root: directory the image paths of the annotations are relative to (default: ``root``).
        predict_dir: a folder of images to caption with ``vlgen predict`` (default: the test split);
            ``pkg:NAME/SUBDIR`` is a folder of an installed package, e.g. ``pkg:skimage/data`` (sample photos).
        batch_size: training batch size per device.
        eval_batch_size: validation / test / predict batch size per device (default: ``batch_size``).
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to the GPU.
        skip_bad_samples: skip (log and count) unusable records and unreadable images; false raises on the first.
        image_size: image side of the fallback transform, used only without a model that provides one.
        generate: a synthetic world to write into ``root`` when it is not there yet.
        prompt_field: the record field holding each sample's own text for the model to read before the caption
            (a question, an instruction); evaluation then keeps one sample per (media, text). None: captions only.
        task: visual question answering instead of captions (:class:`~vlgen.data.VQATask`): the split files are
            VQAv2 / OK-VQA, GQA or LAVIS question files, one sample per question, scored by the task's metric.
    """

    media_field = "image"
    media_suffixes = IMAGE_SUFFIXES

    def __init__(
        self,
        root: str,
        train_file: str | None = "train.json",
        val_file: str | None = "val.json",
        test_file: str | None = "test.json",
        image_root: str | None = None,
        predict_dir: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        skip_bad_samples: bool = True,
        image_size: int = 224,
        generate: ShapesWorld | None = None,
        prompt_field: str | None = None,
        task: VQATask | None = None,
    ) -> None:
        super().__init__(
            root=root,
            files={"train": train_file, "val": val_file, "test": test_file},
            media_root=image_root,
            predict_dir=predict_dir,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            skip_bad_samples=skip_bad_samples,
            image_size=image_size,
            generate=generate,
            prompt_field=prompt_field,
            task=task,
        )
        self.image_root = self.media_root

    def _dataset(self, items: list[CaptionItem], media_root: Path, transform: Transform, train: bool) -> Dataset:
        return ImageCaptionDataset(items, media_root, transform, self.strict)
