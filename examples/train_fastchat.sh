# The seed's FastChat full fine-tuning command (SEED.md section 6) with the program name changed
# (fastchat/train/train_mem.py -> -m zhtrain.sft; `zhtrain train_mem` is the same command).
torchrun --nproc_per_node=8 --master_port=20001 -m zhtrain.sft \
    --model_name_or_path ~/model_weights/Alpaca-Plus-13b \
    --data_path data/dummy_conversation.json \
    --bf16 True \
    --output_dir output \
    --num_train_epochs 5 \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 2 \
    --gradient_accumulation_steps 16 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 1200 \
    --save_total_limit 10 \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --fsdp "full_shard auto_wrap" \
    --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer' \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --lazy_preprocess True
