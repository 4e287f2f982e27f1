"""dicomnode.graph"""
