"""The convnet study's penalised phase alone, with a chosen optimizer.

    python -m tf_layersparse.experiments convnet --quick --dataset fashion_mnist --out OUT
    TF_LAYERSPARSE_DATA_DIR=../shared/datasets python benchmarks/convnet_penalised_phase.py \\
        OUT/baseline.keras --momentum 0.9 --rate 0.05 --strength 8

Starts from a study's trained baseline, runs `convnet_study._train_layer_sparse`
(the `--quick` configuration: same data split, epochs and cosine decay) with
SGD at the given momentum and initial rate, and prints `active_layers` per
epoch, the folded cost and the validation accuracy. Used to see whether
layers that are inactive after the first penalised epoch stay so
(docs/RESULTS.md, convnet re-run).
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="baseline.keras written by the convnet study")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--strength", type=float, default=8.0)
    args = parser.parse_args(argv)

    import keras

    from tf_layersparse.experiments import convnet
    from tf_layersparse.experiments import convnet_study as study
    from tf_layersparse.experiments.datasets import load_images

    class Config(study.StudyConfig):
        def recipe(self, epochs, learning_rate=None):
            return convnet.TrainConfig(epochs=epochs, batch_size=self.batch_size,
                                       learning_rate=args.rate, momentum=args.momentum,
                                       seed=self.seed)

    config = Config.quick("mobilenet")
    data = study.split_data(load_images(args.dataset), config)
    baseline = keras.saving.load_model(args.baseline)
    trial = study._train_layer_sparse(baseline, args.strength, data, config, print)
    print(f"momentum {args.momentum:g}, rate {args.rate:g}, strength {args.strength:g}: "
          f"folded {trial['report'].after}; validation accuracy {trial['val_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
