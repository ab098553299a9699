"""Build the pseudo-labelled instance dataset: segment, cache, COCO JSON per fold.

    python dataset.py DATA_DIR OUT_DIR --size 512 --segmenter builtin --folds 5

The same as ``python -m hpa_scc prepare ...``; see ``python dataset.py --help``.
"""

import sys

from hpa_scc.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
