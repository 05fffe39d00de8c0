"""Vision side: the image processor, experts and their mixture."""
