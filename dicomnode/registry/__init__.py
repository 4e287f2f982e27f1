"""dicomnode.registry"""
