"""Build and push the runner images that dataloop.json names.

The manifest is the one place the image tags are written: each compute config's `runtime.runnerImage`
ends in `-<target>`, and the repository's Dockerfile builds it with `--target <target>` (`-gpu`: the gpu
target, `-cpu`: the cpu target). Bump the tag there and this script builds the new one.

    python docker/images.py --dry-run     # print the docker commands
    python docker/images.py [--push]      # build from the repository root (and push)
"""
import argparse
import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(ROOT, 'dataloop.json')
DOCKERFILE = os.path.join(ROOT, 'Dockerfile')


def targets(dockerfile: str = DOCKERFILE) -> List[str]:
    """The build targets (`FROM ... AS <name>`) of the Dockerfile, in order."""
    with open(dockerfile) as f:
        return re.findall(r'^FROM\s+\S+\s+AS\s+(\S+)\s*$', f.read(), flags=re.MULTILINE | re.IGNORECASE)


def target_for(image: str) -> str:
    """`registry/name:version-gpu` -> `gpu`, the Dockerfile's target that builds it."""
    tag = image.rsplit('/', 1)[-1].partition(':')[2]
    if '-' not in tag:
        raise ValueError(f'runner image {image!r}: its tag must end in -<target> naming a target of the Dockerfile')
    return tag.rsplit('-', 1)[1]


def images(manifest: Dict, dockerfile: str = DOCKERFILE) -> Dict[str, str]:
    """Every runner image the manifest's compute configs name -> the Dockerfile's target that builds it."""
    known, built = targets(dockerfile), {}
    for compute in manifest['components']['computeConfigs']:
        image = compute['runtime']['runnerImage']
        target = target_for(image)
        if target not in known:
            raise ValueError(f'compute config {compute["name"]!r} names {image!r}, but the Dockerfile has no '
                             f'target {target!r} (it has {known})')
        built[image] = target
    return built


def commands(manifest: Dict, push: bool = False) -> List[List[str]]:
    """The docker commands that build (and push) every image, run from the repository root."""
    result = []
    for image, target in sorted(images(manifest).items()):
        # the platform's nodes are x86-64, whatever machine builds the image
        result.append(['docker', 'build', '--platform', 'linux/amd64', '--target', target, '-t', image, '.'])
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
