"""Train a tiny OSDN on Shakespeare on the CPU, save, reload and generate (see README.md)."""

from osdn_hf.demo import main

if __name__ == "__main__":
    main()
