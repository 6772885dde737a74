"""`python tests/fnet_cli.py eval ...`: the genlab CLI with the small feature network saved in $GENLAB_TEST_FNET
standing in for every dataset's (subprocess tests of evaluation, which cannot monkeypatch), and the toy families."""

import os
import sys

import genlab.eval.features as F
import genlab.eval.report as R
from genlab.cli import main
from genlab.registry import MODELS

MODELS.modules.append("toy_family")  # this script's folder is on sys.path

if __name__ == "__main__":
    fnet = F.load_feature_network(os.environ["GENLAB_TEST_FNET"])
    F.get_feature_network = R.get_feature_network = lambda *a, **k: fnet
    sys.exit(main())
