"""Evaluation: genlab-trained feature networks, FID / KID / IS / precision-recall, likelihoods."""
