"""What every tuned model shares, classifier (``PromptedViT``) or segmenter (``SegmentationModel``): saving
its adapter, publishing it and exporting it, each over the model's ``adapter_tensors()`` and
``adapter_config()`` (as peft's models share ``save_pretrained`` whatever their task)."""
from __future__ import annotations

from .adapter_format import write_adapter


class AdapterMixin:
    """``save_adapter``, ``push_to_hub`` and ``export_onnx`` for a model that defines ``adapter_tensors()``
    (what an adapter stores) and ``adapter_config()`` (what it records beside them)."""

    def save_adapter(self, directory, **extra) -> None:
        """The tuned tensors and the config (plus ``extra``, e.g. metrics), committed in one atomic step."""
        write_adapter(directory, self.adapter_tensors(), {**self.adapter_config(), **extra})

    def export_onnx(self, path, *, opset: int | None = None) -> dict:
        """This model as an ONNX file that onnxruntime runs without PyTorch or ivpt (see ``ivpt.deploy``, which
        tells classification and segmentation apart by the config's task); returns the metadata written into
        it (class names, preprocessing, method, adapter digest)."""
        from .deploy import OPSET, export_onnx

        return export_onnx(self, path, opset=opset or OPSET)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, dry_run=None,
                    token: str | None = None) -> str:
        """Publish this adapter with its model card to the Hub repo ``repo_id`` (see ``ivpt.hub``: saved into a
        temporary folder, pushed with the card)."""
        from .hub import push_model

        return push_model(self, repo_id, private=private, dry_run=dry_run, token=token)
