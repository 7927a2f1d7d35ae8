"""Build and push the runner images that dataloop.json names.

The manifest is the one place the image tags are written: each compute config's `runtime.runnerImage`
ends in `-<flavour>`, and `docker/<flavour>.Dockerfile` builds it (`-gpu`: docker/gpu.Dockerfile,
`-cpu`: docker/cpu.Dockerfile). Bump the tag there and this script builds the new one.

    python docker/images.py --dry-run     # print the docker commands
    python docker/images.py [--push]      # build from the repository root (and push)
"""
import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(ROOT, 'dataloop.json')


def dockerfile_for(image: str) -> str:
    """`registry/name:version-gpu` -> `docker/gpu.Dockerfile` (relative to the repository root)."""
    tag = image.rsplit('/', 1)[-1].partition(':')[2]
    if '-' not in tag:
        raise ValueError(f'runner image {image!r}: its tag must end in -<flavour> naming docker/<flavour>.Dockerfile')
    return f'docker/{tag.rsplit("-", 1)[1]}.Dockerfile'


def images(manifest: Dict) -> Dict[str, str]:
    """Every runner image the manifest's compute configs name -> the Dockerfile that builds it."""
    built = {}
    for compute in manifest['components']['computeConfigs']:
        image = compute['runtime']['runnerImage']
        dockerfile = dockerfile_for(image)
        if not os.path.isfile(os.path.join(ROOT, dockerfile)):
            raise ValueError(f'compute config {compute["name"]!r} names {image!r}, but {dockerfile} does not exist')
        built[image] = dockerfile
    return built


def commands(manifest: Dict, push: bool = False) -> List[List[str]]:
    """The docker commands that build (and push) every image, run from the repository root."""
    result = []
    for image, dockerfile in sorted(images(manifest).items()):
        # the platform's nodes are x86-64, whatever machine builds the image
        result.append(['docker', 'build', '--platform', 'linux/amd64', '-f', dockerfile, '-t', image, '.'])
        if push:
            result.append(['docker', 'push', image])
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--push', action='store_true', help='push each image after building it')
    parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
    args = parser.parse_args(argv)
    with open(MANIFEST) as f:
        manifest = json.load(f)
    for command in commands(manifest, push=args.push):
        print(' '.join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, cwd=ROOT, check=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
