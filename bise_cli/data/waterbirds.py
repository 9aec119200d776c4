"""Waterbirds (Sagawa et al., ICLR 2020): a preset of the table dataset (`bise_cli.data.table`).

The release (`waterbird_complete95_forest2water2`, see https://github.com/kohpangwei/group_DRO#waterbirds) is a
folder of bird images in `<species>/<file>.jpg` subfolders and `metadata.csv` with `img_filename`, `y` (0 landbird,
1 waterbird), `place` (0 land, 1 water background) and `split` (0 train, 1 val, 2 test). conf/dataset/waterbirds.yaml
maps those columns onto the table options; this module only names the bundle and explains a missing release.
"""

from __future__ import annotations

from pathlib import Path

from bise_cli.core.errors import BiseError
from bise_cli.data import table
from bise_cli.data.base import DatasetBundle

RELEASE_HINT = ("the Waterbirds release folder (waterbird_complete95_forest2water2, see "
                "https://github.com/kohpangwei/group_DRO#waterbirds)")


def build(source: str, root: str | Path, seed: int, max_samples: int | None = None, **options) -> DatasetBundle:
    """The table builder on the release's metadata.csv, the bundle named `waterbirds`."""
    manifest = options.get("manifest")
    if isinstance(manifest, (str, Path)) and not Path(manifest).expanduser().is_file():
        raise BiseError(f"no Waterbirds metadata at {manifest}; set dataset.root to {RELEASE_HINT}")
    return table.build(source, root, seed, max_samples, name="waterbirds", **options)
