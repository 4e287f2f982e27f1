"""dicomnode.dispatch"""
