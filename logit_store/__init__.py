"""logit_store"""
