"""DALI pipeline graphs (imported as meld_dali.pipelines; needs nvidia-dali)."""
