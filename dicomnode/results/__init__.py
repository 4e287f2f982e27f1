"""dicomnode.results"""
