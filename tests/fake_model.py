"""A stand-in for SED where only a command's control flow is under test (no weights, instant)."""
import torch

from sed_fast.inputs.images import as_image_list


class FakeModel:
    device = torch.device("cpu")
    random_weights = True

    def set_vocabulary(self, names, progress=None):
        self.class_names = list(names)
        return self.class_names

    def __call__(self, images):
        batch = as_image_list(images)  # the model's own input checks
        generator = torch.Generator().manual_seed(0)
        return [torch.rand(len(self.class_names), *size, generator=generator) for size in batch.sizes]

    def predict_labels(self, images):
        return [scores.argmax(0) for scores in self(images)]
