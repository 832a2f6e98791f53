"""etpo_lightning/envs"""
