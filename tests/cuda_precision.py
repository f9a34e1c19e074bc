"""The generator update's precision on a CUDA GPU, with the paper U-Net (random weights, f near f*).

    python tests/cuda_precision.py [--batch 8]

Prints one JSON line per gap |f* - f| / |f*| in (1e-1, 1e-2, 1e-3): the cosine, against a float64
reference, of the gradient that cifar.distill_update leaves on G (and on f, for the fake update)
under each precision setting: the run's (bf16 autocast for G's forward, f* and f float32, TF32 off),
plain float32 (TF32 off), and the run's with TF32 on (what cuDNN does by default)."""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # cifar.py
from test_cifar import distill_args, gradient_of_update, near_teacher_on  # noqa: E402

SETTINGS = {"bf16 (the run's)": ("bf16", False), "fp32": ("fp32", False), "bf16, TF32 on": ("bf16", True)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images in the batch")
    parser.add_argument("--net", default="paper", help="U-Net preset")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_precision.py: no CUDA GPU found")
    dev = torch.device("cuda")
    for gap in (1e-1, 1e-2, 1e-3):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the gap, measured exactly
        f_star, f_fake, x0 = near_teacher_on(dev, args.net, gap, args.batch)
        row = {"gap": gap, "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "net": args.net,
               "batch": args.batch}
        for update, step in (("generator", 5), ("fake", 0)):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            reference = gradient_of_update(step, f_star, f_star, f_fake, x0, distill_args(), torch.float64)
            for name, (precision, tf32) in SETTINGS.items():
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
                grad = gradient_of_update(step, f_star, f_star, f_fake, x0, distill_args(bf16=precision == "bf16"),
                                          torch.float32)
                row[f"{update}: {name}"] = round(torch.nn.functional.cosine_similarity(grad, reference, 0).item(), 6)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
