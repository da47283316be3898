"""Draw the kept patches of every spatial block of LAUD-ResNet-50 over a real photograph.

    python examples/kept_patches.py --out kept_patches.png [--weights laud_resnet50.pt]

The photograph is scikit-image's bundled astronaut (NASA, public domain). Without trained masker
weights (--weights, a state dict of a spatial LAUD-ResNet-50) the maskers decide at random with
--force-keep, so the picture shows the mechanics, not learned saliency.
"""

import argparse

import torch

from laudnet_ops.models import laud_resnet50
from laudnet_ops.nn import set_execution, set_force_keep
from laudnet_ops.pictures import overlay_kept_patches


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kept_patches.png")
    parser.add_argument("--weights", help="state dict of a spatial LAUD-ResNet-50")
    parser.add_argument("--force-keep", type=float, default=0.5, help="used when no --weights are given")
    parser.add_argument("--image", default="astronaut", help="a skimage.data sample image name")
    parser.add_argument("--masked", action="store_true", help="run the masked path (no compiled ops needed)")
    args = parser.parse_args()

    import skimage.data

    model = laud_resnet50(mode="spatial")
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    else:
        set_force_keep(model, args.force_keep, seed=0)
    if args.masked:
        set_execution(model, "masked")
    image = getattr(skimage.data, args.image)()
    maps = overlay_kept_patches(model, image, args.out, title=f"LAUD-ResNet-50, spatial, S = 4-4-2-1 ({args.image})")
    print(f"wrote {args.out}: {len(maps)} spatial blocks")


if __name__ == "__main__":
    main()
