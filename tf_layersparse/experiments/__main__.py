import sys

from tf_layersparse.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
