"""dicomnode.synthetic"""
