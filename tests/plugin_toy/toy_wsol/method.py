"""Toy: a seeded random 1x1 convolution from RGB to one map per class (the recipe's example, not a method)."""
import torch

from wsolbench.localizer import Capability, Localizer, LocalizerOutput


class ToyConv(Localizer):
    """Maps = a seeded 1x1 convolution of the resized image, one channel per class."""

    capabilities = frozenset({Capability.SINGLE, Capability.MULTI})
    pretrained = ()  # no pretrained model
    in_demo = False  # `wsolbench demo` leaves it out

    def __init__(self, config=None, class_names=None, device="cpu"):
        super().__init__(config, class_names, device)  # self.config: configs/toy.yaml completed with `config`
        # `self.model` is what the base class saves and loads; seeded, so one config gives one model
        self.model = torch.nn.Conv2d(3, max(1, len(self.class_names)), 1, bias=False)
        torch.nn.init.normal_(self.model.weight, generator=torch.Generator().manual_seed(self.config["seed"]))

    def localize(self, images, classes=None, texts=None, meta=None):
        if texts is not None:
            self.require(Capability.PHRASE)  # the documented InputError
        x = self.preprocess(images, size=self.config["size"])
        # one list of valid class indices per image (else a one-line InputError); None: every class (multi)
        queries = self.class_queries(classes, len(x)) or [list(range(len(self.class_names)))] * len(x)
        with torch.no_grad():
            maps = self.model(x)
        idx = torch.tensor(queries)[:, :, None, None].expand(-1, -1, *maps.shape[-2:])
        return LocalizerOutput(maps=maps.gather(1, idx).float(), classes=queries)
