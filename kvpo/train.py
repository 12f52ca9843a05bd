"""``python -m kvpo.train [--config file.yaml] [--field value ...]``: a KVPO run from the command
line (:func:`kvpo.trainer.main`; from Python, ``kvpo.train(cfg)``)."""

from kvpo.trainer import main

if __name__ == "__main__":
    main()
