"""dicomnode.inference"""
