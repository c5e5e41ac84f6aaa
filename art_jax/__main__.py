from art_jax.cli import main

main()
