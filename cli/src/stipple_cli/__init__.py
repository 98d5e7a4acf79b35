"""The `stipple` command. `stipple up` runs the whole network on one machine."""
