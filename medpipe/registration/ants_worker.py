"""The ANTs side of the ANTs SyN baseline: a small server run by the Python of an environment
with ANTsPy (`antspyx`), which pins numpy below the version medpipe uses, so it lives in its
own environment as nnU-Net's does. It imports ANTsPy only, never medpipe.

Protocol, one JSON object per line: a request on stdin
    {"fixed": PATH, "moving": PATH, "prefix": PATH, "transform": "SyN", "seed": 0}
is answered on stdout by
    {"transforms": [warp, affine], "seconds": S}     or     {"error": MESSAGE}
where the transforms are ANTsPy's `fwdtransforms` files and S the seconds ANTs spent in
`ants.registration` (reading the images included). The first line it writes is
{"ready": ANTSPY_VERSION}. Started with --deterministic it runs ANTs single-threaded with
a fixed seed (`ants.config.set_ants_deterministic`), which reproduces a result exactly;
with several threads ANTs' metric sampling makes results vary from run to run.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    deterministic = "--deterministic" in sys.argv[1:]
    if deterministic:  # before ANTs starts any thread
        import os

        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    import ants

    if deterministic:
        ants.config.set_ants_deterministic(True)
    print(json.dumps({"ready": ants.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            start = time.perf_counter()
            fixed = ants.image_read(request["fixed"])
            moving = ants.image_read(request["moving"])
            result = ants.registration(
                fixed, moving, type_of_transform=request["transform"],
                outprefix=request["prefix"], random_seed=request["seed"])
            reply = {"transforms": list(result["fwdtransforms"]),
                     "seconds": time.perf_counter() - start}
        except Exception as error:  # one failed pair must not end the server
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
