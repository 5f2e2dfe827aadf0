import sys

from tf_layersparse.experiments.cli import main

sys.exit(main())
