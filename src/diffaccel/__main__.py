from diffaccel.cli import script

script()
