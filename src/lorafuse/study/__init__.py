"""`lorafuse study`: the paper's whole comparison on one library, cached stage by stage."""
