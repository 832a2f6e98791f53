"""etpo_lightning/tiny_coder"""
