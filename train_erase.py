from salun_diffusers.cli import main  # placeholder until the core lands
if __name__ == "__main__":
    main()
